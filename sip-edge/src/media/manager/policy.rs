//! The security rules a pinhole endpoint and a dialog must pass before
//! anything is allocated (DESIGN.md §3): forbidden targets, ports, caps.

use super::*;

impl Manager {
    pub(super) fn is_edge_addr(&self, ip: IpAddr) -> bool {
        self.s.internal_addrs.contains(&ip) || self.s.public_addrs.contains(&ip)
    }

    /// DESIGN.md §3 address rules for one endpoint named in SDP.
    pub(super) fn check_endpoint(
        &self,
        side: Side,
        source: SocketAddr,
        proto: Proto,
        ep: SocketAddr,
    ) -> Result<(), MediaError> {
        let ip = ep.ip();
        let allowed_subnet = self
            .s
            .allowed_internal_subnets
            .iter()
            .any(|c| c.contains(ip));
        match side {
            Side::Internal => {
                if ip != source.ip() && !allowed_subnet {
                    return Err(forbidden(format!(
                        "media target {ep} is neither the client's signalling source {} nor in an allowed internal subnet",
                        source.ip()
                    )));
                }
                // Media never needs a privileged port; refusing them keeps a
                // client from aiming the edge at its own services.
                // RFC 4145 §4: an active-only TCP end writes the discard port 9.
                let tcp_discard = proto == Proto::Tcp && ep.port() == 9;
                if ep.port() < MIN_MEDIA_PORT && !tcp_discard {
                    return Err(forbidden(format!(
                        "media target {ep} uses a privileged port"
                    )));
                }
            }
            Side::External => {
                if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                    return Err(forbidden(format!(
                        "peer media address {ip} is not routable"
                    )));
                }
                if self.is_edge_addr(ip) || allowed_subnet {
                    return Err(forbidden(format!(
                        "peer media address {ip} points inside the edge"
                    )));
                }
            }
        }
        Ok(())
    }

    pub(super) fn recount(&mut self, key: &DialogKey) {
        let Some(d) = self.dialogs.get_mut(key) else {
            return;
        };
        let now = (d.client, d.reserved());
        let before = std::mem::replace(&mut d.counted, now);
        self.total_flows = self
            .total_flows
            .saturating_sub(before.1)
            .saturating_add(now.1);
        if let Some(c) = before.0 {
            let e = self.per_client.entry(c).or_insert(0);
            *e = e.saturating_sub(before.1);
            if *e == 0 {
                self.per_client.remove(&c);
            }
        }
        if let Some(c) = now.0 {
            if now.1 > 0 {
                *self.per_client.entry(c).or_insert(0) += now.1;
            }
        }
    }

    pub(super) fn check_caps(&self, key: &DialogKey) -> Result<(), MediaError> {
        let Some(d) = self.dialogs.get(key) else {
            return Ok(());
        };
        if self.total_flows > self.s.max_flows {
            return Err(exhausted(format!(
                "all {} media flows of the edge are in use",
                self.s.max_flows
            )));
        }
        if let Some(c) = d.client {
            if self.client_flows(c) > self.s.max_flows_per_client {
                return Err(exhausted(format!(
                    "client {c} already holds its {} media flows",
                    self.s.max_flows_per_client
                )));
            }
        }
        Ok(())
    }
}
