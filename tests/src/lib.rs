//! sip-edge's test harness: what the system tests, the demo and the
//! benchmarks share, kept out of the agent crate so the product's
//! dependency tree carries no test-only crate.
//!
//! - `testnet`: network namespaces, veths, the agent as a child process;
//! - `edge`: the system tests' fixture: the agent in the edge namespace,
//!   its CLI, the peer-side user agent and an outgoing call through it;
//! - `testua`: a TLS SIP user agent and a throwaway PKI;
//! - `floods`: attack generators of the flood tests and the soak;
//! - `ha_net`: the two-edge HA topology with a Redis store (issue #11);
//! - `fixtures`: the datapath verdict fixtures and their BPF_PROG_TEST_RUN runner;
//! - `harness`: the test/bench XDP object (pass-through, generator, sink);
//! - `softphone`: Kamailio and baresip as real third-party peers, tone checks;
//! - `bench`: the benchmark suite behind `cargo xtask bench`.

pub mod bench;
pub mod edge;
pub mod fixtures;
pub mod floods;
pub mod ha_net;
pub mod harness;
pub mod softphone;
pub mod testnet;
pub mod testua;
