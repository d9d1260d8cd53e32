//! Which runner serves a deployment: rendezvous (highest random weight)
//! hashing of the deployment id over the runners' names.
//!
//! Each runner gets a score per deployment, `score(runner, deployment)`; the
//! runners are ranked by it, highest first, and a request goes to the first
//! healthy one. A runner leaving moves only the deployments it ranked first
//! for (each to its own second), and one joining takes only those it now
//! ranks first for: every other deployment stays warm where it is. The
//! function is simple enough for a subhoster's relay to compute the same
//! ranking (README, "The edge").

use sha2::{Digest as _, Sha256};

/// The score of `runner` (its name: the normalised URL) for
/// `deployment_id`: the first 8 bytes, big-endian, of
/// `SHA-256(runner ‖ "\n" ‖ deployment_id)`. A cryptographic hash, not a
/// fast one: its output is uniform whatever the names look like (runners
/// `…:8080/`, `…:8081/` differ in one character), which a simple one does
/// not promise; it costs ~1 µs per runner per request.
pub fn score(runner: &str, deployment_id: &str) -> u64 {
    let digest = Sha256::new().chain_update(runner).chain_update(b"\n").chain_update(deployment_id).finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The indices of `runners` ranked for `deployment_id`, best first (ties,
/// which need equal 64-bit scores, by name).
pub fn rank<S: AsRef<str>>(deployment_id: &str, runners: &[S]) -> Vec<usize> {
    let mut scored: Vec<(u64, usize)> =
        runners.iter().enumerate().map(|(i, name)| (score(name.as_ref(), deployment_id), i)).collect();
    scored.sort_by(|(a_score, a), (b_score, b)| {
        b_score.cmp(a_score).then_with(|| runners[*a].as_ref().cmp(runners[*b].as_ref()))
    });
    scored.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runners(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{}:8080/", i + 1)).collect()
    }

    fn ids(n: usize) -> Vec<String> {
        // The control plane's deployment ids: 12 characters of [a-z0-9].
        (0..n).map(|i| format!("{:012x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16)).collect()
    }

    /// The documented formula, computed by hand: a relay that follows the
    /// README gets the same numbers.
    #[test]
    fn the_score_is_the_documented_formula() {
        let digest = Sha256::digest(b"http://10.0.0.1:8080/\naaaaaaaaaaaa");
        let expected = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(score("http://10.0.0.1:8080/", "aaaaaaaaaaaa"), expected);
        // Pinned (`printf 'http://10.0.0.1:8080/\naaaaaaaaaaaa' | sha256sum`,
        // first 16 hex digits), so a change of the formula cannot pass unnoticed.
        assert_eq!(expected, 0x98e2_cf86_622d_44dd);
    }

    #[test]
    fn the_ranking_is_stable_and_independent_of_the_runners_order() {
        let list = runners(5);
        let mut reversed = list.clone();
        reversed.reverse();
        for id in ids(200) {
            let first = rank(&id, &list);
            assert_eq!(first, rank(&id, &list), "the same every time");
            let names: Vec<&String> = first.iter().map(|&i| &list[i]).collect();
            let names_reversed: Vec<&String> = rank(&id, &reversed).iter().map(|&i| &reversed[i]).collect();
            assert_eq!(names, names_reversed, "{id}: the order the runners are listed in does not matter");
            let mut sorted = first.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..5).collect::<Vec<_>>(), "every runner once");
        }
    }

    /// 3,000 deployments over 3 runners: each runner is first for a third,
    /// within ±15%.
    #[test]
    fn deployments_spread_evenly_over_the_runners() {
        let list = runners(3);
        let mut first = [0usize; 3];
        for id in ids(3000) {
            first[rank(&id, &list)[0]] += 1;
        }
        println!("first for, of 3000: {first:?}");
        for (runner, count) in first.iter().enumerate() {
            assert!((850..=1150).contains(count), "runner {runner} is first for {count} of 3000: {first:?}");
        }
    }

    /// A runner leaves: exactly its deployments move, each to its second
    /// choice; the others stay. It comes back: the same ones move back.
    #[test]
    fn only_the_leaving_runners_deployments_move() {
        let all = runners(3);
        let without: Vec<String> = vec![all[0].clone(), all[2].clone()];
        let (mut moved, mut stayed) = (0, 0);
        for id in ids(3000) {
            let before = rank(&id, &all);
            let owner = &all[before[0]];
            let after = &without[rank(&id, &without)[0]];
            if *owner == all[1] {
                assert_eq!(*after, all[before[1]], "{id}: to its second choice");
                moved += 1;
            } else {
                assert_eq!(after, owner, "{id}: a deployment of a runner that stayed did not move");
                stayed += 1;
            }
        }
        assert!(moved > 800 && stayed > 1600, "moved {moved}, stayed {stayed}");

        // A fourth runner joins: only what it now ranks first for moves, to it.
        let more = runners(4);
        for id in ids(3000) {
            let before = &all[rank(&id, &all)[0]];
            let after = &more[rank(&id, &more)[0]];
            assert!(after == before || *after == more[3], "{id}: moved between two runners that stayed");
        }
    }
}
