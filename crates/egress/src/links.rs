//! The proxy's own outbound connections, by local address, with the hop
//! count of the call each carries. When one arrives at this runner's ingress
//! (an isolate calling into the same cloud), the ingress finds its hop count
//! here — for tunnels too, whose bytes the proxy cannot add a header to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub(crate) struct Links {
    by_local_addr: Mutex<HashMap<SocketAddr, u32>>,
}

impl Links {
    pub(crate) fn register(self: &Arc<Self>, local_addr: SocketAddr, hops: u32) -> LinkGuard {
        self.by_local_addr.lock().expect("links poisoned").insert(local_addr, hops);
        LinkGuard { links: self.clone(), local_addr }
    }

    pub(crate) fn hops_of(&self, peer: SocketAddr) -> Option<u32> {
        self.by_local_addr.lock().expect("links poisoned").get(&peer).copied()
    }
}

/// Removes its link when the connection is done.
pub(crate) struct LinkGuard {
    links: Arc<Links>,
    local_addr: SocketAddr,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        self.links.by_local_addr.lock().expect("links poisoned").remove(&self.local_addr);
    }
}
