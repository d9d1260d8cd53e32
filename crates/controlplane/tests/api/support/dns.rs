//! A tiny authoritative DNS responder over UDP on 127.0.0.1:0: TXT and A
//! records set at run time, NXDOMAIN for every other name. Hand-encoded
//! (RFC 1035 §4), just enough for the control plane's verification checks.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TYPE_A: u16 = 1;
const TYPE_TXT: u16 = 16;
const CLASS_IN: u16 = 1;

#[derive(Default)]
struct Zone {
    txt: HashMap<String, Vec<String>>,
    a: HashMap<String, Ipv4Addr>,
}

pub struct DnsResponder {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl DnsResponder {
    /// Answers on a thread of its own: a test that blocks its runtime (a
    /// CLI run waited for) must not leave a resolver's query unanswered.
    pub async fn start() -> Self {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let addr = socket.local_addr().expect("addr");
        // Short reads so a dropped responder's thread notices and ends.
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("udp read timeout");
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (served, stopped) = (Arc::clone(&zone), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else { continue };
                let reply = answer(&buf[..n], &served.lock().unwrap());
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        DnsResponder { addr, zone, stop, thread: Some(thread) }
    }

    pub fn set_txt(&self, name: &str, value: &str) {
        self.zone.lock().unwrap().txt.entry(name.to_ascii_lowercase()).or_default().push(value.to_owned());
    }

    pub fn set_a(&self, name: &str, ip: Ipv4Addr) {
        self.zone.lock().unwrap().a.insert(name.to_ascii_lowercase(), ip);
    }
}

/// The name in a question (labels up to the root), and where it ends.
fn read_name(message: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*message.get(at)?);
        at += 1;
        if len == 0 {
            return Some((labels.join("."), at));
        }
        if len > 63 {
            return None; // no compression in questions we accept
        }
        labels.push(String::from_utf8_lossy(message.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
}

fn answer(query: &[u8], zone: &Zone) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let (name, end) = read_name(query, 12)?;
    let qtype = u16::from_be_bytes([*query.get(end)?, *query.get(end + 1)?]);
    let question = &query[12..end + 4];

    let mut rdatas: Vec<Vec<u8>> = Vec::new();
    let known = zone.txt.contains_key(&name) || zone.a.contains_key(&name);
    match qtype {
        TYPE_TXT => {
            for value in zone.txt.get(&name).into_iter().flatten() {
                // One TXT record: character-strings of at most 255 bytes.
                let mut rdata = Vec::new();
                for chunk in value.as_bytes().chunks(255) {
                    rdata.push(chunk.len() as u8);
                    rdata.extend_from_slice(chunk);
                }
                rdatas.push(rdata);
            }
        }
        TYPE_A => rdatas.extend(zone.a.get(&name).map(|ip| ip.octets().to_vec())),
        _ => {}
    }

    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[0..2]); // id
    let rd = query[2] & 0x01;
    reply.push(0x84 | rd); // QR, AA, RD copied
    reply.push(if known { 0x80 } else { 0x83 }); // RA; NOERROR or NXDOMAIN
    reply.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    reply.extend_from_slice(&(rdatas.len() as u16).to_be_bytes()); // ANCOUNT
    reply.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    reply.extend_from_slice(question);
    for rdata in rdatas {
        reply.extend_from_slice(&[0xC0, 12]); // pointer to the question's name
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        reply.extend_from_slice(&rdata);
    }
    Some(reply)
}
