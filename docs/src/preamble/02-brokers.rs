// What chapter 2's examples assume.
let mut registry = Registry::default();
let rabbit: RabbitTransport = any();
let kafka: KafkaTransport = any();
let log = surety_core::memory::MemoryLog::new();
let checkpoints = Checkpoints;
let view = View;
let progress = Progress;
let worker = Worker::new(AckAll);
let deliveries: DeliveryStream = any();
let shutdown = shutdown_signal();
