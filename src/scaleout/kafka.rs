//! Kafka, the scale-out click source: topic checks at start, the collector's producer, and the
//! consumer-group context whose rebalance callback claims partitions in PostgreSQL.
//!
//! Records are the collector's validated clicks (`event::wire`), keyed by `ad_id` and sent to
//! an explicit partition (`partition_of(route_hash(ad_id))`), so every click of an ad lands in
//! one partition and deduplication stays inside it. Kafka's committed offsets are not used:
//! positions come from PostgreSQL, written with the results.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset as KOffset, TopicPartitionList};

use futures_util::future::BoxFuture;

use crate::api::{Collector, IngestError};
use crate::engine::PartitionId;
use crate::scaleout::pg;

/// What went wrong talking to the brokers.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {what}: {source}")]
    Client {
        what: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The topic is missing or does not fit the settings; the message says what to do.
    #[error("kafka: {0}")]
    Topic(String),
    #[error("kafka: the producer was dropped")]
    Dropped,
    /// The brokers have not acknowledged for this many seconds; nothing was sent.
    #[error(
        "kafka: the brokers have not acknowledged for {0} s; nothing of this request was sent"
    )]
    Down(u64),
}

/// Wraps an rdkafka error with what was being done.
fn client(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
    let what = what.into();
    move |source| KafkaError::Client { what, source }
}

/// How long start-up waits for the brokers before giving up with an error.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", "10000")
        .set("client.id", "adclick");
    c
}

/// Checks that the brokers answer and the topic has `partitions` partitions, creating it when
/// missing. A topic with another partition count is refused: ads would change partitions.
pub fn ensure_topic(brokers: &str, topic: &str, partitions: u32) -> Result<(), KafkaError> {
    let probe = probe(brokers)?;
    let found = |probe: &BaseConsumer| topic_partitions(probe, brokers, topic);
    let mut count = found(&probe)?;
    if count.is_none() {
        let admin: AdminClient<DefaultClientContext> =
            base_config(brokers).create().map_err(client("admin client"))?;
        let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KafkaError::Topic(format!("creating topic {topic:?}: {e}")))?;
        let results = rt
            .block_on(admin.create_topics([&new], &opts))
            .map_err(client(format!("creating topic {topic:?}")))?;
        for r in results {
            if let Err((name, code)) = r {
                if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    return Err(KafkaError::Topic(format!("creating topic {name:?}: {code}")));
                }
            }
        }
        tracing::info!(topic, partitions, "created the Kafka topic");
        for _ in 0..100 {
            count = found(&probe)?;
            if count.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    match count {
        Some(n) if n == partitions as usize => Ok(()),
        Some(n) => Err(KafkaError::Topic(format!(
            "topic {topic:?} has {n} partitions but partitions = {partitions}; the ad_id → \
             partition mapping would change and split ads' clicks. Set partitions = {n}, or use \
             a new topic"
        ))),
        None => Err(KafkaError::Topic(format!("topic {topic:?} did not appear after creating it"))),
    }
}

/// The collector's side: acknowledged means acknowledged by every in-sync replica.
pub struct Sink {
    /// Replaced after a fatal error (a broker that restarted may fence an idempotent producer).
    producer: std::sync::RwLock<FutureProducer>,
    brokers: String,
    topic: String,
    partitions: u32,
    /// Since when the brokers have failed to acknowledge, and when a request last tried them:
    /// meanwhile other requests are answered 503 at once (one a second still tries).
    down: Mutex<Option<(std::time::Instant, std::time::Instant)>>,
}

/// How long the collector waits for the brokers to acknowledge a request's records.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// While the brokers fail, one request in this interval tries them; the others get 503 at once.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The producer settings every adclick producer uses: idempotent, acknowledged by every
/// in-sync replica, given up after 30 s.
fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = base_config(brokers);
    c.set("enable.idempotence", "true").set("acks", "all").set("message.timeout.ms", "30000");
    c
}

impl Sink {
    pub fn new(brokers: &str, topic: &str, partitions: u32) -> Result<Sink, KafkaError> {
        Ok(Sink {
            producer: std::sync::RwLock::new(Self::producer(brokers)?),
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            partitions,
            down: Mutex::new(None),
        })
    }

    fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
        producer_config(brokers)
            .set("linger.ms", "2")
            .set("message.timeout.ms", ACK_TIMEOUT.as_millis().to_string())
            .create()
            .map_err(client("producer"))
    }

    /// Replaces a producer that failed for good: a fatal error, or its idempotent identity
    /// refused (a broker that restarted without its producer state fences it; a new producer
    /// gets a new identity). Either way it would refuse every later record.
    fn renew_if_fenced(&self, e: &KafkaError) {
        let refused = matches!(
            e,
            KafkaError::Client { source, .. }
                if source.rdkafka_error_code().is_some_and(identity_refused)
        );
        let mut producer = self.producer.write().expect("not poisoned");
        if !refused && producer.client().fatal_error().is_none() {
            return;
        }
        match Self::producer(&self.brokers) {
            Ok(p) => {
                tracing::warn!("kafka: {e}: the producer is replaced by a new one");
                *producer = p;
            }
            Err(e) => tracing::warn!("kafka: replacing a failed producer: {e}"),
        }
    }

    /// Sends every record and returns once the brokers acknowledged all of them. While they
    /// fail to, requests are refused at once, but for one a second that tries them again.
    pub async fn append(&self, parts: Vec<(PartitionId, Vec<Vec<u8>>)>) -> Result<(), KafkaError> {
        {
            let mut down = self.down.lock().expect("not poisoned");
            if let Some((since, probed)) = down.as_mut() {
                if probed.elapsed() < PROBE_EVERY {
                    return Err(KafkaError::Down(since.elapsed().as_secs()));
                }
                *probed = std::time::Instant::now();
            }
        }
        let result = self.send_all(&parts).await;
        if let Err(e) = &result {
            self.renew_if_fenced(e);
        }
        let mut down = self.down.lock().expect("not poisoned");
        match &result {
            Ok(()) => {
                if down.take().is_some() {
                    tracing::info!("kafka: the brokers acknowledge again");
                }
            }
            Err(e) => {
                if down.is_none() {
                    tracing::warn!("{e}; answering 503 until the brokers acknowledge again");
                    let now = std::time::Instant::now();
                    *down = Some((now, now));
                }
            }
        }
        result
    }

    async fn send_all(&self, parts: &[(PartitionId, Vec<Vec<u8>>)]) -> Result<(), KafkaError> {
        let producer = self.producer.read().expect("not poisoned").clone();
        let mut pending = Vec::new();
        let mut value = Vec::new();
        for (p, records) in parts {
            for r in records {
                let key = crate::event::wire::decode(r).map(|c| c.ad_id.to_string());
                value.clear();
                value.push(crate::scaleout::WIRE_MAGIC);
                value.extend_from_slice(r);
                let mut rec = FutureRecord::<String, Vec<u8>>::to(&self.topic)
                    .partition(p.0 as i32)
                    .payload(&value);
                if let Some(k) = &key {
                    rec = rec.key(k);
                }
                match producer.send_result(rec) {
                    Ok(f) => pending.push(f),
                    Err((e, _)) => return Err(client("queueing a record")(e)),
                }
            }
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(client("a record was not acknowledged")(e)),
                Err(_) => return Err(KafkaError::Dropped),
            }
        }
        Ok(())
    }

    pub fn flush(&self) {
        let producer = self.producer.read().expect("not poisoned").clone();
        let _ = producer.flush(Duration::from_secs(10));
    }
}

impl Collector for Sink {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn append(
        &self,
        parts: Vec<(PartitionId, Vec<Vec<u8>>)>,
    ) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            Sink::append(self, parts).await.map_err(|e| IngestError::Broker(Box::new(e)))
        })
    }
}

/// The partition count of an existing topic.
pub fn partition_count(brokers: &str, topic: &str) -> Result<u32, KafkaError> {
    topic_partitions(&probe(brokers)?, brokers, topic)?.map(|n| n as u32).ok_or_else(|| {
        KafkaError::Topic(format!(
            "topic {topic:?} does not exist; `adclick serve --kafka` creates it"
        ))
    })
}

/// A client for metadata requests.
fn probe(brokers: &str) -> Result<BaseConsumer, KafkaError> {
    base_config(brokers).create().map_err(client(format!("bad client settings for {brokers:?}")))
}

/// The topic's partition count, `None` when it does not exist; an error naming the brokers
/// when they do not answer within [`METADATA_TIMEOUT`].
fn topic_partitions(
    probe: &BaseConsumer,
    brokers: &str,
    topic: &str,
) -> Result<Option<usize>, KafkaError> {
    let md = probe.fetch_metadata(Some(topic), METADATA_TIMEOUT).map_err(client(format!(
        "cannot reach the brokers at {brokers} within {}s",
        METADATA_TIMEOUT.as_secs()
    )))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|&n| n > 0))
}

/// A broker refused an idempotent producer's identity: that producer is done for.
fn identity_refused(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::ProducerFenced
            | Code::InvalidProducerEpoch
            | Code::UnknownProducerId
            | Code::OutOfOrderSequenceNumber
            | Code::InvalidProducerIdMapping
    )
}

/// Notes a marker refused for the producer's identity (see [`identity_refused`]).
#[derive(Default)]
struct MarkerContext {
    refused: std::sync::atomic::AtomicBool,
}

impl ClientContext for MarkerContext {}

impl rdkafka::producer::ProducerContext for MarkerContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if e.rdkafka_error_code().is_some_and(identity_refused) {
                self.refused.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Sends the aggregators' end markers (see `aggregate`), without waiting for them.
pub struct Markers {
    producer: rdkafka::producer::ThreadedProducer<MarkerContext>,
    brokers: String,
    topic: String,
}

impl Markers {
    pub fn new(brokers: &str, topic: &str) -> Result<Markers, KafkaError> {
        let producer = Self::producer(brokers)?;
        Ok(Markers { producer, brokers: brokers.to_string(), topic: topic.to_string() })
    }

    fn producer(
        brokers: &str,
    ) -> Result<rdkafka::producer::ThreadedProducer<MarkerContext>, KafkaError> {
        producer_config(brokers)
            .create_with_context(MarkerContext::default())
            .map_err(client("marker producer"))
    }

    /// Whether a broker refused this producer's identity.
    fn fenced(&self) -> bool {
        self.producer.context().refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues a marker for partition `p`; one lost is sent again by the caller. A producer that
    /// failed for good (fenced by a broker that restarted) is replaced first.
    pub fn send(&mut self, p: PartitionId, nonce: u64, wall: i64) {
        if self.producer.client().fatal_error().is_some() || self.fenced() {
            match Self::producer(&self.brokers) {
                Ok(producer) => self.producer = producer,
                Err(e) => tracing::warn!("kafka: replacing the marker producer: {e}"),
            }
        }
        let bytes = crate::scaleout::marker(nonce, wall);
        let rec = rdkafka::producer::BaseRecord::<(), [u8]>::to(&self.topic)
            .partition(p.0 as i32)
            .payload(bytes.as_slice());
        if let Err((e, _)) = self.producer.send(rec) {
            tracing::debug!(partition = p.0, "kafka: queueing an end marker: {e}");
        }
    }
}

/// Raw NDJSON lines into the topic, as any other producer may send them (`adclick generate` and
/// `adclick ship` to `kafka://…`): keyed by their `ad_id` and sent to the partition the collector
/// would choose (lines without one to partition 0). The aggregator validates them; invalid ones
/// are counted as such.
pub struct LineProducer {
    producer: rdkafka::producer::BaseProducer,
    topic: String,
    partitions: u32,
    /// For messages: where the lines go.
    pub target: String,
}

impl LineProducer {
    /// For `kafka://host:port[,host:port][/topic]` (the part after `kafka://`; the topic is
    /// `ad-clicks` unless named): the topic must exist.
    pub fn connect(rest: &str) -> Result<LineProducer, KafkaError> {
        let (brokers, topic) = match rest.split_once('/') {
            Some((b, t)) if !t.is_empty() => (b.to_string(), t.to_string()),
            _ => (rest.trim_end_matches('/').to_string(), "ad-clicks".to_string()),
        };
        let partitions = partition_count(&brokers, &topic)?;
        let producer = producer_config(&brokers).create().map_err(client("producer"))?;
        let target = format!("kafka://{brokers}/{topic}");
        Ok(LineProducer { producer, topic, partitions, target })
    }

    /// Sends `lines` and returns once all are acknowledged.
    pub fn send(&self, lines: &[String]) -> Result<(), KafkaError> {
        let (producer, topic, partitions) = (&self.producer, self.topic.as_str(), self.partitions);
        // Routing needs the ad id as the collector normalizes it (a numeric ad_id is the same ad
        // as its decimal string): parsed as a click, whatever its time.
        let any_time =
            crate::event::Validation { now: crate::event::EventTime(i64::MAX / 4), max_skew_ms: 0 };
        for line in lines {
            let ad = match crate::event::parse_line(line.as_bytes(), any_time) {
                Ok(Some(c)) => Some(c.ad_id.to_string()),
                _ => serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| {
                    match v.get("ad_id")? {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    }
                }),
            };
            let partition = ad
                .as_deref()
                .map_or(0, |a| crate::event::partition_of(crate::event::route_hash(a), partitions));
            let mut rec = rdkafka::producer::BaseRecord::<str, str>::to(topic)
                .partition(partition as i32)
                .payload(line.as_str());
            if let Some(a) = &ad {
                rec = rec.key(a.as_str());
            }
            let mut rec = Some(rec);
            while let Some(r) = rec.take() {
                match producer.send(r) {
                    Ok(()) => {}
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        r,
                    )) => {
                        producer.poll(Duration::from_millis(10));
                        rec = Some(r);
                    }
                    Err((e, _)) => return Err(client("queueing a line")(e)),
                }
            }
        }
        producer.flush(Duration::from_secs(30)).map_err(client("flushing"))?;
        Ok(())
    }
}

/// A partition assignment change, seen by the aggregator loop after `poll` returns.
pub enum Change {
    Assigned(PartitionId, pg::Claim),
    Revoked(PartitionId),
}

/// The consumer's context: on assignment it claims each partition in PostgreSQL (bumping its
/// epoch) and starts fetching at the offset stored there; on revocation it reports the loss.
pub struct GroupContext {
    /// Claims wait out a PostgreSQL outage (see [`crate::scaleout::conn::Conn`]).
    pub claims: Mutex<crate::scaleout::conn::Conn>,
    pub owner: String,
    pub changes: Mutex<Vec<Change>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let mut changes = self.changes.lock().expect("not poisoned");
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut client = self.claims.lock().expect("not poisoned");
                let mut claimed = Vec::new();
                let elems: Vec<(String, i32)> =
                    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
                for (topic, p) in elems {
                    let id = PartitionId(p as u32);
                    let claim = match client
                        .retry("claiming a partition", |c| pg::claim(c, id, &self.owner))
                    {
                        Ok(c) => c,
                        Err(e) if e.is_transient() => {
                            // Stopping during an outage: take nothing.
                            tracing::warn!(partition = p, "not claimed: {e}");
                            return;
                        }
                        Err(e) => crate::fault::fatal("claiming a partition", e),
                    };
                    tracing::info!(
                        partition = p,
                        epoch = claim.epoch,
                        offset = claim.next_offset,
                        files = claim.files.len(),
                        "assigned"
                    );
                    if let Err(e) =
                        tpl.set_partition_offset(&topic, p, KOffset::Offset(claim.next_offset))
                    {
                        crate::fault::fatal("positioning a partition", e);
                    }
                    claimed.push(Change::Assigned(id, claim));
                }
                if let Err(e) = consumer.assign(tpl) {
                    crate::fault::fatal("taking the assignment", e);
                }
                changes.extend(claimed);
            }
            _ => {
                for e in tpl.elements() {
                    tracing::info!(partition = e.partition(), "revoked");
                    changes.push(Change::Revoked(PartitionId(e.partition() as u32)));
                }
                let _ = consumer.unassign();
            }
        }
    }
}

/// Joins the consumer group on `topic` with auto-commit off.
pub fn consumer(
    brokers: &str,
    group: &str,
    topic: &str,
    ctx: GroupContext,
    session_timeout: Duration,
) -> Result<Arc<BaseConsumer<GroupContext>>, KafkaError> {
    let consumer: BaseConsumer<GroupContext> = base_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_timeout.as_millis().to_string())
        .set("heartbeat.interval.ms", (session_timeout.as_millis() / 4).max(100).to_string())
        // Also the rebalance timeout: how long a rebalance waits for a member that stopped
        // (some brokers wait for it even after its session expired).
        .set(
            "max.poll.interval.ms",
            (session_timeout * 3).max(Duration::from_secs(20)).as_millis().to_string(),
        )
        .set("partition.assignment.strategy", "roundrobin")
        .create_with_context(ctx)
        .map_err(client("consumer"))?;
    consumer.subscribe(&[topic]).map_err(client("subscribing"))?;
    Ok(Arc::new(consumer))
}
