//! SIP signalling: sans-IO pieces (stream framer, message validation and
//! normalisation, SDP rewriting) that the TLS proxy drives.
//!
//! Data flow: socket/TLS bytes → [`framer`] (frames) → [`message`] (owned,
//! validated message; URIs via [`uri`]) → body rewriters [`sdp`] and
//! [`msmsgs`] (new body + the media flows for the pinhole manager; a
//! `multipart/mixed` body is split and reassembled by [`multipart`]) →
//! [`message::Message::to_bytes`] → TLS writer.

pub mod framer;
pub mod message;
pub mod msmsgs;
pub mod multipart;
pub mod sdp;
pub mod uri;
