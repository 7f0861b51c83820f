//! How a handler's outputs (replies, commands, events) are stored with its
//! dedup key, so that a duplicate gets the very same messages (same ids)
//! emitted again and the requester can deduplicate them too.

use serde::{Deserialize, Serialize};
use surety_core::Envelope;
use surety_core::consumer::Output;

use crate::error::StoreError;

/// The stored form: versioned JSON, envelopes in their CloudEvents
/// structured form. Version 1 stored a single reply.
#[derive(Serialize, Deserialize)]
struct Stored {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    envelope: Option<Envelope>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    outputs: Vec<StoredOutput>,
}

#[derive(Serialize, Deserialize)]
struct StoredOutput {
    topic: String,
    envelope: Envelope,
}

/// Encodes `outputs` for the store; `None` when there is nothing to store.
pub(crate) fn encode(outputs: &[Output]) -> Result<Option<Vec<u8>>, StoreError> {
    if outputs.is_empty() {
        return Ok(None);
    }
    let stored = Stored {
        v: 2,
        topic: None,
        envelope: None,
        outputs: outputs
            .iter()
            .map(|o| StoredOutput {
                topic: o.destination.clone(),
                envelope: o.envelope.clone(),
            })
            .collect(),
    };
    serde_json::to_vec(&stored)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("outputs cannot be encoded: {e}")))
}

/// Reads stored outputs back.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<Output>, StoreError> {
    let stored: Stored = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("stored outputs: {e}")))?;
    match stored {
        Stored {
            v: 1,
            topic: Some(topic),
            envelope: Some(envelope),
            ..
        } => Ok(vec![Output::new(topic, envelope)]),
        Stored { v: 2, outputs, .. } => Ok(outputs
            .into_iter()
            .map(|o| Output::new(o.topic, o.envelope))
            .collect()),
        Stored { v, .. } => Err(StoreError::Corrupt(format!(
            "stored outputs have unknown version {v}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip_and_version_1_replies_still_read() {
        let a = Envelope::builder("/payments", "payment.captured").build();
        let b = Envelope::builder("/payments", "payment.audited").build();
        let outputs = vec![
            Output::new("checkout.replies", a.clone()),
            Output::new("audit", b),
        ];
        let bytes = encode(&outputs)
            .expect("encodes")
            .expect("something stored");
        assert_eq!(decode(&bytes).expect("decodes"), outputs);
        assert_eq!(encode(&[]).expect("encodes"), None);

        let v1 = serde_json::json!({ "v": 1, "topic": "checkout.replies", "envelope": a });
        let v1 = serde_json::to_vec(&v1).expect("json");
        assert_eq!(
            decode(&v1).expect("decodes"),
            vec![Output::new("checkout.replies", a)]
        );
        assert!(decode(br#"{"v":9}"#).is_err());
    }
}
