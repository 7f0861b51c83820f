//! Property tests: every envelope survives both wire forms, and no input
//! bytes make decoding panic.

use chrono::{DateTime, Utc};
use proptest::collection::btree_map;
use proptest::option;
use proptest::prelude::*;
use surety_core::codec::{JsonCodec, PayloadCodec};
use surety_core::headers::keys;
use surety_core::{Classify, Envelope, ErrorClass, Headers};

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Years 1970..=9999, any nanosecond.
    (0i64..253_402_300_799, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).expect("in range"))
}

fn non_empty() -> impl Strategy<Value = String> {
    ".{1,40}"
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        (
            non_empty(),
            non_empty(),
            non_empty(),
            time(),
            ".{0,30}",
            any::<u32>(),
        ),
        (
            option::of(".*"),
            option::of(".*"),
            option::of(".*"),
            option::of(".*"),
        ),
        // Header keys that are not envelope attributes, so binary mode can
        // tell them apart.
        btree_map("x-[a-z0-9-]{0,20}", ".*", 0..8),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(
                (id, source, ty, time, content_type, version),
                (subject, key, corr, cause),
                headers,
                payload,
            )| {
                let mut env = Envelope::builder(source, ty)
                    .id(id)
                    .time(time)
                    .content_type(content_type)
                    .schema_version(version)
                    .headers(headers.into_iter().collect::<Headers>())
                    .payload(payload)
                    .build();
                env.subject = subject;
                env.partition_key = key;
                env.correlation_id = corr;
                env.causation_id = cause;
                env
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_envelope_round_trips_through_the_json_codec(env in envelope()) {
        let bytes = JsonCodec.encode(&env).expect("encodes");
        let back: Envelope = JsonCodec.decode(&bytes).expect("decodes");
        prop_assert_eq!(&back, &env);
        prop_assert_eq!(Envelope::from_json(&env.to_json()).expect("decodes"), env);
    }

    #[test]
    fn any_envelope_round_trips_through_binary_mode(env in envelope()) {
        let (headers, payload) = env.to_binary();
        prop_assert!(headers.contains(keys::ce::ID));
        prop_assert_eq!(Envelope::from_binary(headers, payload).expect("decodes"), env);
    }

    #[test]
    fn attributes_win_over_user_headers_of_the_same_name(
        env in envelope(),
        clashing in btree_map(prop_oneof![Just(keys::ce::ID), Just(keys::ce::TIME),
            Just(keys::ce::SCHEMA_VERSION), Just(keys::ce::SUBJECT), Just(keys::ce::PARTITION_KEY),
            Just(keys::ce::CORRELATION_ID), Just(keys::ce::CAUSATION_ID)], ".{0,10}", 0..7)
    ) {
        let mut env = env;
        for (key, value) in clashing {
            env.headers.insert(key, value);
        }
        // The user headers, then every attribute the envelope has over them.
        let mut expected: std::collections::BTreeMap<String, String> =
            env.headers.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let time = env.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let version = env.schema_version.to_string();
        for (key, value) in [
            (keys::ce::SPECVERSION, Some("1.0")),
            (keys::ce::ID, Some(env.id.as_str())),
            (keys::ce::SOURCE, Some(env.source.as_str())),
            (keys::ce::TYPE, Some(env.event_type.as_str())),
            (keys::ce::TIME, Some(time.as_str())),
            (keys::ce::CONTENT_TYPE, Some(env.content_type.as_str())),
            (keys::ce::SCHEMA_VERSION, Some(version.as_str())),
            (keys::ce::SUBJECT, env.subject.as_deref()),
            (keys::ce::PARTITION_KEY, env.partition_key.as_deref()),
            (keys::ce::CORRELATION_ID, env.correlation_id.as_deref()),
            (keys::ce::CAUSATION_ID, env.causation_id.as_deref()),
        ] {
            if let Some(value) = value {
                expected.insert(key.to_owned(), value.to_owned());
            }
        }
        let (headers, _) = env.to_binary();
        let built: std::collections::BTreeMap<String, String> =
            headers.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        prop_assert_eq!(&built, &expected);
        let mut visited = Vec::new();
        env.for_each_binary_header(|key, value| visited.push((key.to_owned(), value.to_owned())));
        prop_assert_eq!(visited.len(), expected.len(), "each header once");
        prop_assert_eq!(visited.into_iter().collect::<std::collections::BTreeMap<_, _>>(), expected);
    }

    #[test]
    fn arbitrary_bytes_decode_to_poison_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(err) = Envelope::from_json(&bytes) {
            prop_assert_eq!(err.class(), ErrorClass::Poison);
        }
        let env = Envelope::builder("/fuzz", "fuzz").payload(bytes).build();
        if let Err(err) = env.decode::<OrderPlaced>() {
            prop_assert_eq!(err.class(), ErrorClass::Poison);
        }
    }

    #[test]
    fn arbitrary_headers_decode_to_an_envelope_or_poison(
        headers in btree_map(prop_oneof![Just(keys::ce::ID.to_owned()), Just(keys::ce::TIME.to_owned()),
            Just(keys::ce::SOURCE.to_owned()), Just(keys::ce::TYPE.to_owned()),
            Just(keys::ce::SCHEMA_VERSION.to_owned()), ".{0,8}"], ".{0,40}", 0..10)
    ) {
        let headers: Headers = headers.into_iter().collect();
        if let Err(err) = Envelope::from_binary(headers, bytes::Bytes::new()) {
            prop_assert_eq!(err.class(), ErrorClass::Poison);
        }
    }
}

/// A realistic payload for decode fuzzing.
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct OrderPlaced {
    order_id: String,
    quantity: u32,
    lines: Vec<(String, u64)>,
}

#[test]
fn truncated_and_mangled_json_envelopes_are_poison() {
    let env = Envelope::builder("/orders", "order.placed")
        .payload(&b"payload"[..])
        .build();
    let json = env.to_json();
    for cut in 0..json.len() {
        let err = Envelope::from_json(&json[..cut]).expect_err("a prefix is not an envelope");
        assert_eq!(err.class(), ErrorClass::Poison);
    }
    let mangled = String::from_utf8(json.to_vec())
        .expect("json is utf-8")
        .replace("data_base64\":\"", "data_base64\":\"!!");
    assert_eq!(
        Envelope::from_json(mangled.as_bytes())
            .expect_err("bad base64")
            .class(),
        ErrorClass::Poison
    );
}
