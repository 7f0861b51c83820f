// What chapter 2's examples assume: the parameters of the function each
// example is compiled in.
mut registry: Registry,
rabbit: RabbitTransport,
kafka: KafkaTransport,
log: surety_core::memory::MemoryLog,
checkpoints: Checkpoints,
view: View,
progress: Progress,
worker: Worker<AckAll>,
deliveries: DeliveryStream,
shutdown: impl std::future::Future<Output = ()> + Send,
