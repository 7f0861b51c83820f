//! The Surety guide (`docs/guide/*.md`), compiled.
//!
//! Every Rust example in the guide is a doctest of this crate: fragments are
//! type-checked as the body of a hidden async function whose parameters are
//! what the chapter's prose assumes (`src/preamble/<chapter>.rs`), and the
//! examples with a `main` run. `build.rs` prepares the chapters; nothing in
//! the markdown itself is hidden.
//!
//! [`prelude`] holds the names those examples share: the shop's message
//! types and stand-ins for the services they call.

pub mod prelude {
    //! What the guide's examples may name without importing it.

    use serde::{Deserialize, Serialize};

    pub use std::sync::Arc;
    pub use std::time::Duration;

    pub use futures::StreamExt;
    pub use prometheus_client::registry::Registry;
    pub use surety_core::consumer::{
        AckAll, Incoming, Outcome, Output, Router, UnknownType, Worker, handler_fn, typed,
    };
    pub use surety_core::memory::MemoryTransport;
    pub use surety_core::tower::{Layer, ServiceBuilder};
    pub use surety_core::upcast::{UpcastLayer, Upcasters};
    pub use surety_core::{
        Close, DeliveryStream, Envelope, HandlerError, Message, Publisher, Subscriber,
    };
    pub use surety_dlq::store::{MemoryDlqStore, SqliteDlqStore};
    pub use surety_dlq::{DlqLayer, DlqMetrics, Replayer, RetryPolicy};
    pub use surety_idempotency::{
        IdempotencyLayer, IdempotencyMetrics, Marked, MemoryDedupStore, SqliteDedupStore,
    };
    pub use surety_kafka::KafkaTransport;
    pub use surety_rabbitmq::RabbitTransport;

    /// The error the examples' `?` converts into.
    pub type Error = Box<dyn std::error::Error + Send + Sync>;

    /// Resolves when the service should stop (Ctrl-C, SIGTERM).
    pub async fn shutdown_signal() {
        tokio::signal::ctrl_c().await.ok();
    }

    /// An order was placed.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct OrderPlaced {
        /// The order.
        pub order_id: String,
        /// What was ordered.
        pub sku: String,
        /// How many.
        pub quantity: u32,
    }

    impl Message for OrderPlaced {
        const TYPE: &'static str = "com.example.shop.order.placed";
    }

    /// A command to take a payment.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct CapturePayment {
        /// The order paid for.
        pub order_id: String,
        /// In cents.
        pub amount: u64,
    }

    impl Message for CapturePayment {
        const TYPE: &'static str = "com.example.shop.payment.capture";
    }

    /// The payment was taken.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PaymentCaptured {
        /// The order paid for.
        pub order_id: String,
    }

    impl Message for PaymentCaptured {
        const TYPE: &'static str = "com.example.shop.payment.captured";
    }

    /// The payment was declined.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct PaymentDeclined {
        /// The order.
        pub order_id: String,
        /// Why.
        pub reason: String,
    }

    impl Message for PaymentDeclined {
        const TYPE: &'static str = "com.example.shop.payment.declined";
    }

    /// A stand-in for a read model's checkpoint table.
    #[derive(Debug, Clone, Default)]
    pub struct Checkpoints;

    impl Checkpoints {
        /// The next offset to read of `partition`, if one was stored.
        pub async fn load(&self, partition: i32) -> Result<Option<i64>, Error> {
            let _ = partition;
            Ok(None)
        }
    }

    /// A stand-in for a read model.
    #[derive(Debug, Clone, Default)]
    pub struct View;

    impl View {
        /// Applies a record and stores its position, in one transaction.
        pub async fn apply(&self, record: &surety_core::log::LogRecord) -> Result<(), Error> {
            let _ = record;
            Ok(())
        }

        /// Writes what is held for `partitions`.
        pub async fn flush(&self, partitions: &[i32]) -> Result<(), Error> {
            let _ = partitions;
            Ok(())
        }
    }

    /// A stand-in for a progress report.
    #[derive(Debug, Clone, Default)]
    pub struct Progress;

    impl Progress {
        /// `partition` has been read up to `end_offset`.
        pub fn caught_up(&self, partition: i32, end_offset: i64) {
            let _ = (partition, end_offset);
        }
    }

    /// A stand-in for an inventory service client.
    #[derive(Debug, Clone, Default)]
    pub struct Inventory;

    impl Inventory {
        /// Reserves `quantity` of `sku`.
        pub async fn reserve(&self, sku: &str, quantity: u32) -> Result<(), std::io::Error> {
            let _ = (sku, quantity);
            Ok(())
        }
    }

    /// A stand-in for a payment provider client.
    #[derive(Debug, Clone, Default)]
    pub struct Payments;

    impl Payments {
        /// Captures `amount` cents for `order_id`.
        pub async fn capture(&self, order_id: &str, amount: u64) -> Result<(), std::io::Error> {
            let _ = (order_id, amount);
            Ok(())
        }
    }
}

#[cfg(doctest)]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/01-getting-started.md"))]
pub struct GettingStarted;

#[cfg(doctest)]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/02-brokers.md"))]
pub struct Brokers;

#[cfg(doctest)]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/03-failures-and-duplicates.md"))]
pub struct FailuresAndDuplicates;

#[cfg(doctest)]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/04-outbox.md"))]
pub struct Outbox;
