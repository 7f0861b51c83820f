// What chapter 1's examples assume.
let order: OrderPlaced = any();
let orders: Vec<OrderPlaced> = any();
let envelope: Envelope = any();
let publisher = MemoryTransport::new();
let transport = MemoryTransport::new();
let handler = AckAll;
let fulfilment = AckAll;
let replies = AckAll;
let inventory = Inventory;
let payments = Payments;
let pool: sqlx::SqlitePool = any();
let metrics: surety_core::metrics::Metrics = any();
let relay: surety_outbox::Relay<surety_outbox::SqliteOutbox, MemoryTransport> = any();
