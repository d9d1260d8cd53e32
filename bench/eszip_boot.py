#!/usr/bin/env python3
"""Boot time vs code size, in subhosting mode: deployments whose code is one
ESZIP (built by @deno/eszip) of about 10 KB, 1 MB and 10 MB, served by a
subhoster's origin (bench/subhost.py), asked for through relay-signed
requests. One or more runner binaries, each on its own runner and state dir,
are sent the same first requests interleaved, request by request, `--gap-ms`
apart (about one pre-started refill).

    python3 bench/eszip_boot.py [--binary A --binary B] [--n 10] [--origin-delay-ms 0] [--size 10KB]

Two figures per size and binary, first request on a new connection to the
end of the body:
  * never seen: a new deployment with a new layer id (boot RPC, layer fetch
    and ESZIP parse, read_tree, files, module evaluation, first response);
  * layer cached: a new deployment whose layer the runner already holds
    (the boot RPC and read_tree still go to the origin);
  * re-boot: a never-seen deployment again, after its isolate idled out
    (its layer and deno's code cache on disk).
Next to them, the same code run by bare `deno run`: first start (empty
DENO_DIR) and second start (DENO_DIR kept).
`--origin-delay-ms` makes each origin RPC that much late, as a remote origin
is: it shows what running RPCs side by side saves. See docs/benchmarks.md.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Procs, ROOT, big_module, deno_direct, first_response, percentile  # noqa: E402
from subhost import Origin, build_eszip, start_subhost_runner, subhost_get  # noqa: E402

SIZES = [("10 KB", 10_000), ("1 MB", 1_000_000), ("10 MB", 10_000_000)]
IDLE_TIMEOUT_S = 2


def build_sizes(work, labels=None, log=print):
    """{label: eszip bytes}: `main.ts` importing one generated module."""
    built = {}
    for label, size in SIZES:
        if labels and label.replace(" ", "") not in labels:
            continue
        src = os.path.join(work, f"src-{size}")
        os.makedirs(src)
        code, nfun = big_module(size)
        with open(os.path.join(src, "big.js"), "w") as f:
            f.write(code)
        with open(os.path.join(src, "main.ts"), "w") as f:
            f.write(f'import {{ f{nfun - 1} }} from "./big.js";\n'
                    f'Deno.serve({{ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {{}} }}, '
                    f'() => new Response("Hello, world! " + f{nfun - 1}(1)));\n')
        built[label] = build_eszip(src, "main.ts", os.path.join(work, f"{size}.eszip"))
        log(f"{label}: ESZIP of {len(built[label]):,} bytes")
    return built


def layer_name(tag, label, j, k):
    """The layer id of deployment j of size `label` on binary k (its
    deployments are `<layer>-n`, never seen, and `<layer>-l`, layer cached)."""
    return f"{tag}{label}-{j}-{k}".replace(" ", "")


def measure(procs, binaries, origin, eszips, n, gap_s, work, tag=""):
    """Per binary: {label: {"never seen" | "layer cached" | "re-boot" | "boot_ms": [ms]}}."""
    runners = [start_subhost_runner(b, origin, os.path.join(work, f"state{tag}{k}"), spawn=procs.start,
                                    extra=["--idle-timeout-s", str(IDLE_TIMEOUT_S)])[1]
               for k, b in enumerate(binaries)]
    time.sleep(3)  # the pre-started isolates are up
    results = [{label: {"never seen": [], "layer cached": [], "re-boot": [], "boot_ms": []} for label in eszips}
               for _ in binaries]
    for label, eszip in eszips.items():
        for j in range(n):
            for kind in ("never seen", "layer cached"):
                for k, port in enumerate(runners):
                    layer_id = layer_name(tag, label, j, k)
                    origin.layers[layer_id] = eszip
                    deployment_id = f"{layer_id}-{kind[0]}"
                    origin.deployments[deployment_id] = layer_id
                    results[k][label][kind].append(subhost_get(port, deployment_id))
                    time.sleep(gap_s)
    time.sleep(IDLE_TIMEOUT_S + 2)  # every isolate idled out; the boot events reached the origin
    for label in eszips:
        for j in range(n):
            for k, port in enumerate(runners):
                results[k][label]["re-boot"].append(subhost_get(port, f"{layer_name(tag, label, j, k)}-n"))
                time.sleep(gap_s)
    for k in range(len(binaries)):
        for label in eszips:
            for j in range(n):
                boot_ms = origin.boot_ms.get(f"{layer_name(tag, label, j, k)}-n")
                if boot_ms is not None:
                    results[k][label]["boot_ms"].append(boot_ms)
    return results


def p50_p99(samples):
    return f"{statistics.median(samples):.1f} / {percentile(samples, 99):.1f}"


def bare_deno(procs, work, eszips, n):
    """{label: ([first start ms], [second start ms])}: `deno run` of the same
    source, process start to first response, with an empty DENO_DIR and
    again with the one the first start filled."""
    out = {}
    for label, size in SIZES:
        if label not in eszips:
            continue
        first, again = [], []
        for j in range(n):
            deno_dir = os.path.join(work, f"bare-{size}-{j}")
            for samples in (first, again):
                start = time.perf_counter()
                p, port = deno_direct(procs, os.path.join(work, f"src-{size}"), deno_dir)
                first_response(port)
                samples.append((time.perf_counter() - start) * 1000)
                procs.stop(p)
        out[label] = (first, again)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--n", type=int, default=10, help="deployments per size, figure and binary")
    parser.add_argument("--gap-ms", type=int, default=200)
    parser.add_argument("--origin-delay-ms", type=int, default=0)
    parser.add_argument("--size", action="append", choices=[label.replace(" ", "") for label, _ in SIZES],
                        help="only this code size (repeatable; default: all)")
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-eszip-")
    origin = Origin(delay_ms=args.origin_delay_ms)
    try:
        eszips = build_sizes(work, args.size)
        results = measure(procs, binaries, origin, eszips, args.n, args.gap_ms / 1000, work)
        print(f"\nfirst request, ESZIP deployments in subhosting mode, origin RPCs {args.origin_delay_ms} ms late, "
              f"n={args.n} each, interleaved\n")
        print("| runner | code | never seen | layer cached | re-boot | runner's boot_ms p50 |")
        print("| --- | --- | --- | --- | --- | --- |")
        for k, binary in enumerate(binaries):
            for label, figures in results[k].items():
                boot = statistics.median(figures["boot_ms"]) if figures["boot_ms"] else float("nan")
                cells = " | ".join(p50_p99(figures[kind]) for kind in ("never seen", "layer cached", "re-boot"))
                print(f"| {k}: {os.path.relpath(binary, ROOT)} | {label} | {cells} | {boot:.0f} |")
        for label, (first, again) in bare_deno(procs, work, eszips, args.n).items():
            print(f"| bare `deno run` (first / second start) | {label} | {p50_p99(first)} | — | {p50_p99(again)} | — |")
        print("\ncells: p50 / p99 ms")
    finally:
        procs.stop_all()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
