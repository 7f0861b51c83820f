// What chapter 3's examples assume.
let mut registry = Registry::default();
let rabbit: RabbitTransport = any();
let kafka: KafkaTransport = any();
let transport = MemoryTransport::new();
let pool: sqlx::SqlitePool = any();
let handler = AckAll;
let dlq_store: SqliteDlqStore = any();
let dlq_metrics: DlqMetrics = any();
let idempotency_metrics: IdempotencyMetrics = any();
let replayer: Replayer = any();
let fingerprint = String::new();
let id = String::new();
let store: SqliteDedupStore = any();
let dedup_store = MemoryDedupStore::new();
let upcasters = Upcasters::new();
let order: OrderPlaced = any();
let msg: Incoming = any();
