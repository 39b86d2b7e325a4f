//! SIP signalling: sans-IO pieces (stream framer, message validation and
//! normalisation, SDP rewriting) that the TLS proxy drives.

pub mod framer;
pub mod message;
pub mod uri;
pub mod sdp;
