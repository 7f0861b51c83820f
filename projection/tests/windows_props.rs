//! Windowed analytics against a brute-force computation over random
//! event-time streams with disorder and lateness: every window's final
//! result (emitted on close, or still open at the end) equals the
//! aggregate of exactly the events the definition accepts, a closed window
//! is emitted once and never changes, late events are counted, and a
//! snapshot taken anywhere restores the same state.

use std::collections::BTreeMap;

use proptest::prelude::*;
use surety_projection::windows::{CountSum, WindowKind, WindowSpec, Windows};

/// (event time ms, key, value)
type Event = (i64, u8, i64);

fn spec() -> impl Strategy<Value = WindowSpec> {
    prop_oneof![
        (1i64..50, 0i64..40)
            .prop_map(|(size, late)| WindowSpec::tumbling(size).allowed_lateness(late)),
        (1i64..50, 1i64..50, 0i64..40).prop_map(|(size, slide, late)| {
            WindowSpec::sliding(size, slide.min(size)).allowed_lateness(late)
        }),
    ]
}

/// An increasing clock with bounded random disorder (some events far
/// behind).
fn stream() -> impl Strategy<Value = Vec<Event>> {
    proptest::collection::vec((0i64..10, 0i64..60, 0u8..3, -5i64..100), 0..120).prop_map(|steps| {
        let mut clock = 0;
        steps
            .into_iter()
            .map(|(advance, behind, key, value)| {
                clock += advance;
                (clock - behind, key, value)
            })
            .collect()
    })
}

/// The definition, computed from scratch: event `i` goes into window
/// `[s, s + size)` containing its time iff the latest time among events
/// `0..i` is before `s + size + lateness` (or there is none).
fn brute_force(spec: &WindowSpec, events: &[Event]) -> (BTreeMap<(i64, u8), CountSum>, u64) {
    let mut windows: BTreeMap<(i64, u8), CountSum> = BTreeMap::new();
    let mut late = 0;
    for (i, (time, key, value)) in events.iter().enumerate() {
        let watermark = events[..i].iter().map(|e| e.0).max();
        // Every window start s (a multiple of the slide) with
        // s <= time < s + size, by scanning.
        let (size, slide) = size_and_slide(spec);
        let mut accepted = false;
        for start in (time - 200)..=*time {
            let end = start + size;
            if *time >= end || start.rem_euclid(slide) != 0 {
                continue;
            }
            if watermark.is_none_or(|w| w < end + spec.allowed_lateness) {
                accepted = true;
                let entry = windows.entry((start, *key)).or_default();
                entry.count += 1;
                entry.sum += value;
            }
        }
        if !accepted {
            late += 1;
        }
    }
    (windows, late)
}

fn size_and_slide(spec: &WindowSpec) -> (i64, i64) {
    match spec.kind {
        WindowKind::Tumbling { size } => (size, size),
        WindowKind::Sliding { size, slide } => (size, slide),
        _ => unreachable!("the test knows every window kind"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn windows_equal_the_brute_force_fold(spec in spec(), events in stream(), cut in 0usize..120) {
        let mut windows: Windows<u8, CountSum> = Windows::new(spec);
        let mut results: BTreeMap<(i64, u8), CountSum> = BTreeMap::new();
        for (i, (time, key, value)) in events.iter().enumerate() {
            if i == cut {
                // A checkpoint and a restart.
                let json = serde_json::to_string(&windows.snapshot()).expect("a snapshot");
                windows = Windows::restore(serde_json::from_str(&json).expect("a snapshot"));
            }
            for closed in windows.observe(*time, *key, value) {
                let previous = results.insert((closed.start, closed.key), closed.aggregate);
                prop_assert!(previous.is_none(), "window {} emitted twice", closed.start);
                prop_assert!(closed.end + spec.allowed_lateness <= windows.watermark().unwrap_or(i64::MIN));
            }
        }
        for open in windows.open() {
            let previous = results.insert((open.start, open.key), open.aggregate);
            prop_assert!(previous.is_none(), "window {} both closed and open", open.start);
        }
        let (expected, late) = brute_force(&spec, &events);
        prop_assert_eq!(results, expected);
        prop_assert_eq!(windows.late_events(), late);
    }

    #[test]
    fn window_starts_cover_exactly_the_windows_containing_the_time(spec in spec(), time in -1000i64..1000) {
        let starts = spec.starts(time);
        for start in &starts {
            prop_assert!(*start <= time && time < spec.end(*start));
        }
        let (size, slide) = size_and_slide(&spec);
        let expected = (time - size + 1..=time).filter(|s| s.rem_euclid(slide) == 0).count();
        prop_assert_eq!(starts.len(), expected);
    }
}
