//! The reading of the flows' counters spread over the driver's timers
//! (issue #12: at 50k held calls reading every flow at once held the
//! driver for milliseconds each second while new calls waited).

use std::time::Instant;

use super::{MediaController, Part, Parted, PinholeSink, RecordingSink, SinkError, ACTIVITY_PARTS};
use crate::{
    config::MediaCandidates,
    datapath::rules::Flow,
    media::{manager::PinholeId, tests::settings, MediaControl},
};

#[test]
fn every_flow_is_in_exactly_one_part_and_a_whole_reading_takes_all() {
    let mut p: Parted<u64> = Parted::new(ACTIVITY_PARTS);
    for id in 1..=1000u64 {
        assert!(p.insert(PinholeId(id), id).is_none());
    }
    assert_eq!(p.insert(PinholeId(7), 70), Some(7), "a re-insert replaces");
    assert_eq!(p.len(), 1000);
    let mut seen = Vec::new();
    for index in 0..ACTIVITY_PARTS {
        let part = Part {
            index,
            of: ACTIVITY_PARTS,
        };
        for (id, _) in p.part_mut(part) {
            assert_eq!(id.0 % ACTIVITY_PARTS, index, "{id:?} read in part {index}");
            seen.push(id.0);
        }
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=1000).collect::<Vec<_>>(),
        "each flow exactly once"
    );
    assert_eq!(p.part_mut(Part::ALL).count(), 1000);
    // A part of another partition is filtered out of every map.
    let thirds: Vec<u64> = p
        .part_mut(Part { index: 1, of: 3 })
        .map(|(id, _)| id.0)
        .collect();
    assert_eq!(thirds.len(), (1..=1000).filter(|i| i % 3 == 1).count());
    assert!(thirds.iter().all(|i| i % 3 == 1));
    assert_eq!(p.remove(PinholeId(7)), Some(70));
    assert_eq!(p.remove(PinholeId(7)), None);
    assert_eq!((p.len(), p.get(PinholeId(8)).copied()), (999, Some(8)));
}

/// A sink that logs which parts were read and can be made to fail.
#[derive(Default)]
struct PartsSink {
    inner: RecordingSink,
    read: Vec<u64>,
    fail: bool,
}

impl PinholeSink for PartsSink {
    fn install(&mut self, id: PinholeId, flow: &Flow) -> Result<(), SinkError> {
        self.inner.install(id, flow)
    }
    fn update(&mut self, id: PinholeId, old: &Flow, flow: &Flow) -> Result<(), SinkError> {
        self.inner.update(id, old, flow)
    }
    fn remove(&mut self, id: PinholeId) -> Result<(), SinkError> {
        self.inner.remove(id)
    }
    fn activity(&mut self, part: Part) -> Result<Vec<(PinholeId, u64)>, SinkError> {
        if self.fail {
            return Err(SinkError::Refused {
                reason: "counters unreadable".into(),
            });
        }
        assert_eq!(part.of, ACTIVITY_PARTS);
        self.read.push(part.index);
        self.inner.activity(part)
    }
}

fn controller() -> MediaController<PartsSink> {
    MediaController::new(
        settings(),
        MediaCandidates::ReplacePrivateHost,
        PartsSink::default(),
    )
}

#[test]
fn the_timers_read_one_part_each_and_the_tick_what_they_left() {
    let now = Instant::now();
    let mut c = controller();
    let all: Vec<u64> = (0..ACTIVITY_PARTS).collect();
    // No timers (a proxy driven by ticks alone): the tick reads it all.
    c.on_tick(now);
    assert_eq!(std::mem::take(&mut c.sink_mut().read), all);
    // Three timers, then the tick: the tick reads the other seven.
    for _ in 0..3 {
        c.on_timers(now);
    }
    assert_eq!(c.sink().read, [0, 1, 2]);
    c.on_tick(now);
    assert_eq!(std::mem::take(&mut c.sink_mut().read), all);
    // More timers than parts: each part once, then nothing until the tick.
    for _ in 0..ACTIVITY_PARTS + 2 {
        c.on_timers(now);
    }
    c.on_tick(now);
    assert_eq!(std::mem::take(&mut c.sink_mut().read), all);
    // A part that could not be read is not skipped: the tick reads it.
    c.sink_mut().fail = true;
    c.on_timers(now);
    c.sink_mut().fail = false;
    c.on_tick(now);
    assert_eq!(std::mem::take(&mut c.sink_mut().read), all);
}
