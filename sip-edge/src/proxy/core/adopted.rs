//! In-dialog BYEs for calls of an earlier run of the agent (issue #14 item
//! 8, `media::adopt`): after a crash the Contact tokens of old dialogs are
//! gone, so such a BYE cannot be routed (it used to get 404 and its
//! pinholes stayed). The media layer is asked to end the dialog's adopted
//! pinholes; when it had any, the edge answers the BYE itself with 200 (RFC
//! 3261 §15.1.2: the session is over as far as the edge, which anchored
//! its media, is concerned) and a Warning saying the other party was not
//! told; otherwise the routing error stands. With a shared token key
//! (`proxy::tokens`) the old Contact tokens still open, the BYE is routed
//! on to the far party and this answer is not needed.

use super::*;

impl Proxy {
    /// A new read of the HA store is ready: the media layer follows it now
    /// (issue #11: the standby learns of new calls without waiting for
    /// the next tick).
    pub fn sync_replicas(&mut self) {
        self.media.sync_replicas();
    }

    /// For a BYE whose dialog this process does not know: ends the
    /// pinholes an earlier run left for it; whether there were any.
    pub(super) fn end_adopted_dialog(
        &mut self,
        msg: &Message,
        dialog: Option<&DialogKey>,
        now: Instant,
    ) -> bool {
        if dialog.is_some_and(|k| self.dialogs.contains_key(k)) {
            return false;
        }
        let (Ok(call_id), Ok(Some(to_tag))) = (msg.call_id(), msg.to_tag()) else {
            return false;
        };
        let from_tag = msg.from_tag().ok().flatten().unwrap_or_default();
        let ended = self
            .media
            .end_adopted(call_id, &[from_tag.as_str(), to_tag.as_str()], now);
        if ended {
            info!("BYE for a call from before an edge restart: its pinholes are removed");
        }
        ended
    }

    /// The edge's 200 to such a BYE that it could not route on.
    pub(super) fn answer_adopted_bye(
        &mut self,
        conn: ConnId,
        msg: &Message,
        out: &mut Vec<Outgoing>,
    ) {
        let tag = self.new_tag();
        let warning = self.warning(
            conn,
            "call from before an edge restart ended at the edge; the other party was not reachable through it",
        );
        self.respond_local(conn, msg, 200, &tag, &[warning], out);
    }
}
