//! Whether the host firewall lets new connections to the signalling ports
//! in: XDP passes them to the kernel (`pass_signalling`), and an nftables
//! or iptables input chain with policy drop can still refuse them.
//!
//! Evaluated from `nft -j list ruleset` and `iptables-save` /
//! `ip6tables-save` text: a chain hooked on input is walked in order; a
//! rule matching the port's destination (alone, in a set or a range) with
//! `accept` lets it in (other conditions of that rule, such as a source
//! range, are assumed to match: this is a hint, not a packet simulation),
//! a rule that drops or rejects without any match (or matching the port)
//! stops it, `jump`/`goto` into another chain is followed, and the chain's
//! policy decides the rest. Pure functions over the tools' output.

use serde_json::Value;

/// The verdict for one port in one ruleset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted (by a rule, or no input chain drops).
    Accepted(String),
    /// Dropped (by a rule or a policy), with where.
    Dropped(String),
}

/// Whether `port` of `proto` (`tcp`/`udp`) gets in through the nftables
/// ruleset `json` (`nft -j list ruleset`). `None` when the JSON is not
/// a ruleset.
pub fn nft(json: &str, proto: &str, port: u16) -> Option<Verdict> {
    let v: Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let chains: Vec<&Value> = items.iter().filter_map(|i| i.get("chain")).collect();
    let rules: Vec<&Value> = items.iter().filter_map(|i| i.get("rule")).collect();
    let id = |o: &Value| {
        (
            o.get("family")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            o.get("table")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        )
    };
    for c in &chains {
        if c.get("hook").and_then(Value::as_str) != Some("input") {
            continue;
        }
        let family = c.get("family").and_then(Value::as_str).unwrap_or("");
        if !matches!(family, "inet" | "ip" | "ip6") {
            continue;
        }
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        let (fam, table) = id(c);
        let walk = |chain: &str| -> Vec<&Value> {
            rules
                .iter()
                .filter(|r| id(r) == (fam.clone(), table.clone()))
                .filter(|r| r.get("chain").and_then(Value::as_str) == Some(chain))
                .copied()
                .collect()
        };
        let at = format!("{family} {table} {name}");
        match nft_chain(&walk, name, proto, port, 0) {
            // Accepted here; a later hooked chain may still drop.
            Some(ChainEnd::Accept(_)) => {}
            Some(ChainEnd::Drop(r)) => return Some(Verdict::Dropped(format!("{r} in chain {at}"))),
            None => {
                if c.get("policy").and_then(Value::as_str) == Some("drop") {
                    return Some(Verdict::Dropped(format!(
                        "the policy drop of chain {at} (no rule accepts {proto} dport {port})"
                    )));
                }
            }
        }
    }
    Some(Verdict::Accepted(
        "no nftables input chain drops it".to_owned(),
    ))
}

enum ChainEnd {
    Accept(String),
    Drop(String),
}

fn nft_chain<'a>(
    walk: &dyn Fn(&str) -> Vec<&'a Value>,
    chain: &str,
    proto: &str,
    port: u16,
    depth: u8,
) -> Option<ChainEnd> {
    if depth > 8 {
        return None;
    }
    for r in walk(chain) {
        let Some(expr) = r.get("expr").and_then(Value::as_array) else {
            continue;
        };
        let matches: Vec<&Value> = expr.iter().filter_map(|e| e.get("match")).collect();
        let port_match = matches.iter().any(|m| nft_port_match(m, proto, port));
        let other_port_match = matches.iter().any(|m| is_dport(m)) && !port_match;
        if other_port_match {
            continue;
        }
        // Matches on connection state (established, related) never see a
        // new connection; skip them either way.
        if matches.iter().any(|m| is_ct_state(m)) {
            continue;
        }
        for e in expr {
            if e.get("accept").is_some() && port_match {
                return Some(ChainEnd::Accept(format!("rule handle {}", handle(r))));
            }
            if (e.get("drop").is_some() || e.get("reject").is_some())
                && (port_match || matches.is_empty())
            {
                return Some(ChainEnd::Drop(format!("rule handle {}", handle(r))));
            }
            for jump in ["jump", "goto"] {
                if let Some(target) = e
                    .get(jump)
                    .and_then(|j| j.get("target"))
                    .and_then(Value::as_str)
                {
                    if port_match || matches.is_empty() {
                        if let Some(end) = nft_chain(walk, target, proto, port, depth + 1) {
                            return Some(end);
                        }
                    }
                }
            }
        }
    }
    None
}

fn handle(r: &Value) -> String {
    r.get("handle")
        .map_or_else(|| "?".to_owned(), Value::to_string)
}

fn is_dport(m: &Value) -> bool {
    m.get("left")
        .and_then(|l| l.get("payload"))
        .and_then(|p| p.get("field"))
        .and_then(Value::as_str)
        == Some("dport")
}

fn is_ct_state(m: &Value) -> bool {
    m.get("left")
        .and_then(|l| l.get("ct"))
        .and_then(|c| c.get("key"))
        .and_then(Value::as_str)
        == Some("state")
}

fn nft_port_match(m: &Value, proto: &str, port: u16) -> bool {
    let Some(p) = m.get("left").and_then(|l| l.get("payload")) else {
        return false;
    };
    let pr = p.get("protocol").and_then(Value::as_str).unwrap_or("");
    if p.get("field").and_then(Value::as_str) != Some("dport") || !(pr == proto || pr == "th") {
        return false;
    }
    let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
    let hit = value_has(m.get("right"), port);
    match op {
        "!=" => !hit,
        _ => hit,
    }
}

fn value_has(v: Option<&Value>, port: u16) -> bool {
    let Some(v) = v else { return false };
    if let Some(n) = v.as_u64() {
        return n == u64::from(port);
    }
    if let Some(r) = v.get("range").and_then(Value::as_array) {
        let lo = r.first().and_then(Value::as_u64).unwrap_or(u64::MAX);
        let hi = r.get(1).and_then(Value::as_u64).unwrap_or(0);
        return (lo..=hi).contains(&u64::from(port));
    }
    if let Some(s) = v.get("set").and_then(Value::as_array) {
        return s.iter().any(|e| value_has(Some(e), port));
    }
    false
}

/// Whether `port` of `proto` gets in through `iptables-save` output.
/// `None` when there is no filter table.
pub fn iptables(save: &str, proto: &str, port: u16) -> Option<Verdict> {
    let mut in_filter = false;
    let mut policies = std::collections::HashMap::new();
    let mut rules: Vec<(String, String)> = Vec::new();
    for line in save.lines() {
        let l = line.trim();
        if let Some(t) = l.strip_prefix('*') {
            in_filter = t == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(p) = l.strip_prefix(':') {
            let mut w = p.split_whitespace();
            if let (Some(chain), Some(policy)) = (w.next(), w.next()) {
                policies.insert(chain.to_owned(), policy.to_owned());
            }
        } else if let Some(r) = l.strip_prefix("-A ") {
            if let Some((chain, rest)) = r.split_once(' ') {
                rules.push((chain.to_owned(), rest.to_owned()));
            }
        }
    }
    if policies.is_empty() {
        return None;
    }
    match ipt_chain(&rules, "INPUT", proto, port, 0) {
        Some(ChainEnd::Accept(r)) => Some(Verdict::Accepted(format!(
            "iptables rule `{r}` accepts {proto} dport {port}"
        ))),
        Some(ChainEnd::Drop(r)) => Some(Verdict::Dropped(r)),
        None if policies.get("INPUT").map(String::as_str) == Some("DROP") => {
            Some(Verdict::Dropped(format!(
                "the iptables INPUT policy DROP (no rule accepts {proto} dport {port})"
            )))
        }
        None => Some(Verdict::Accepted(
            "the iptables INPUT chain does not drop it".to_owned(),
        )),
    }
}

fn ipt_chain(
    rules: &[(String, String)],
    chain: &str,
    proto: &str,
    port: u16,
    depth: u8,
) -> Option<ChainEnd> {
    if depth > 8 {
        return None;
    }
    for (c, r) in rules.iter().filter(|(c, _)| c == chain) {
        let words: Vec<&str> = r.split_whitespace().collect();
        let arg = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .and_then(|i| words.get(i + 1).copied())
        };
        if words.contains(&"--ctstate") || words.contains(&"--state") {
            continue;
        }
        let target = arg("-j").or_else(|| arg("-g")).unwrap_or("");
        let rule_proto = arg("-p");
        let ports = arg("--dport").or_else(|| arg("--dports"));
        let port_hit = match ports {
            Some(list) => {
                rule_proto.is_none_or(|p| p == proto)
                    && list.split(',').any(|part| match part.split_once(':') {
                        Some((a, b)) => {
                            let lo = a.parse().unwrap_or(0);
                            let hi = b.parse().unwrap_or(u16::MAX);
                            (lo..=hi).contains(&port)
                        }
                        None => part.parse() == Ok(port),
                    })
            }
            None => false,
        };
        if ports.is_some() && !port_hit {
            continue;
        }
        // Unconditional: no match flags besides the target.
        let unconditional = words.len() == 2 && (words[0] == "-j" || words[0] == "-g");
        match target {
            "ACCEPT" if port_hit => {
                return Some(ChainEnd::Accept(format!("-A {c} {r}")));
            }
            "DROP" | "REJECT" if port_hit || unconditional => {
                return Some(ChainEnd::Drop(format!("iptables rule `-A {c} {r}`")));
            }
            "" | "ACCEPT" | "DROP" | "REJECT" | "RETURN" | "LOG" => {}
            other if port_hit || unconditional => {
                if let Some(end) = ipt_chain(rules, other, proto, port, depth + 1) {
                    return Some(end);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruleset(policy: &str, rules: &str) -> String {
        format!(
            r#"{{"nftables":[{{"metainfo":{{"json_schema_version":1}}}},
            {{"table":{{"family":"inet","name":"filter","handle":1}}}},
            {{"chain":{{"family":"inet","table":"filter","name":"input","handle":1,"type":"filter","hook":"input","prio":0,"policy":"{policy}"}}}},
            {{"chain":{{"family":"inet","table":"filter","name":"sip","handle":9}}}}
            {rules}]}}"#
        )
    }

    fn rule(chain: &str, handle: u32, expr: &str) -> String {
        format!(
            r#",{{"rule":{{"family":"inet","table":"filter","chain":"{chain}","handle":{handle},"expr":[{expr}]}}}}"#
        )
    }

    const CT: &str = r#"{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}"#;

    fn dport(proto: &str, right: &str) -> String {
        format!(
            r#"{{"match":{{"op":"==","left":{{"payload":{{"protocol":"{proto}","field":"dport"}}}},"right":{right}}}}}"#
        )
    }

    #[test]
    fn nft_policy_drop_without_a_rule_for_the_port_drops_it() {
        let rs = ruleset(
            "drop",
            &(rule("input", 2, CT)
                + &rule(
                    "input",
                    3,
                    &format!("{},{{\"accept\":null}}", dport("tcp", "22")),
                )),
        );
        assert!(
            matches!(nft(&rs, "tcp", 5061), Some(Verdict::Dropped(w)) if w.contains("policy drop"))
        );
        assert!(matches!(nft(&rs, "tcp", 22), Some(Verdict::Accepted(_))));
    }

    #[test]
    fn nft_sets_ranges_and_jumps_accept_the_port() {
        for right in [
            "5061",
            r#"{"set":[22,5061]}"#,
            r#"{"set":[22,{"range":[5060,5062]}]}"#,
            r#"{"range":[5000,6000]}"#,
        ] {
            let rs = ruleset(
                "drop",
                &rule(
                    "input",
                    2,
                    &format!("{},{{\"accept\":null}}", dport("tcp", right)),
                ),
            );
            assert!(
                matches!(nft(&rs, "tcp", 5061), Some(Verdict::Accepted(_))),
                "{right}"
            );
            assert!(
                matches!(nft(&rs, "udp", 5061), Some(Verdict::Dropped(_))),
                "{right}"
            );
        }
        let rs = ruleset(
            "drop",
            &(rule("input", 2, r#"{"jump":{"target":"sip"}}"#)
                + &rule(
                    "sip",
                    3,
                    &format!("{},{{\"accept\":null}}", dport("th", "5061")),
                )),
        );
        assert!(matches!(nft(&rs, "tcp", 5061), Some(Verdict::Accepted(_))));
        // Policy accept, but a final unconditional drop.
        let rs = ruleset("accept", &rule("input", 2, r#"{"drop":null}"#));
        assert!(
            matches!(nft(&rs, "tcp", 5061), Some(Verdict::Dropped(w)) if w.contains("handle 2"))
        );
        let rs = ruleset("accept", "");
        assert!(matches!(nft(&rs, "tcp", 5061), Some(Verdict::Accepted(_))));
        assert_eq!(nft("not json", "tcp", 5061), None);
    }

    #[test]
    fn iptables_save_is_evaluated_like_the_kernel_walks_input() {
        let save =
            "*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:SIP - [0:0]\n\
            -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
            -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
            -A INPUT -p tcp -m multiport --dports 5060,5061 -j SIP\n\
            -A SIP -s 198.51.100.0/24 -j ACCEPT\n\
            -A SIP -p tcp -m tcp --dport 5060:5061 -j ACCEPT\nCOMMIT\n";
        assert!(matches!(
            iptables(save, "tcp", 5061),
            Some(Verdict::Accepted(_))
        ));
        assert!(
            matches!(iptables(save, "tcp", 5062), Some(Verdict::Dropped(w)) if w.contains("policy DROP"))
        );
        let open = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j REJECT\nCOMMIT\n";
        assert!(
            matches!(iptables(open, "udp", 5060), Some(Verdict::Dropped(w)) if w.contains("REJECT"))
        );
        assert_eq!(
            iptables("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "tcp", 1),
            None
        );
    }
}
