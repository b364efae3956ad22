//! MQTT source: subscribes with QoS 1 and manual acknowledgements. A PUBACK
//! is sent only after the reading's batch is durable in the outbox, so the
//! broker redelivers anything the agent had not made safe.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::MqttSourceConfig;
use crate::pipeline::{Envelope, MqttPublish};
use crate::stats::Stats;

/// Builds the client options, reading secrets and certificates from files.
fn options(config: &MqttSourceConfig) -> anyhow::Result<MqttOptions> {
    let mut opts = MqttOptions::new(&config.client_id, &config.host, config.port);
    opts.set_keep_alive(Duration::from_secs(config.keep_alive_seconds));
    opts.set_clean_session(!config.persistent_session);
    opts.set_manual_acks(true);
    opts.set_max_packet_size(config.max_packet_bytes, 64 * 1024);
    if let Some(user) = &config.username {
        let password = match &config.password_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading sources.mqtt.password_file {}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            None => String::new(),
        };
        opts.set_credentials(user, password);
    }
    if let Some(tls) = &config.tls {
        let ca = std::fs::read(&tls.ca_file).with_context(|| {
            format!("reading sources.mqtt.tls.ca_file {}", tls.ca_file.display())
        })?;
        let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => Some((
                std::fs::read(cert).with_context(|| {
                    format!(
                        "reading sources.mqtt.tls.client_cert_file {}",
                        cert.display()
                    )
                })?,
                std::fs::read(key).with_context(|| {
                    format!("reading sources.mqtt.tls.client_key_file {}", key.display())
                })?,
            )),
            _ => None,
        };
        opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(opts)
}

pub struct MqttSource {
    pub config: MqttSourceConfig,
    pub stats: Arc<Stats>,
}

impl MqttSource {
    /// Validates files (password, certificates) before anything starts.
    pub fn check(&self) -> anyhow::Result<()> {
        options(&self.config).map(|_| ())
    }

    pub async fn run(
        self,
        tx: mpsc::Sender<Envelope>,
        mut acks: mpsc::UnboundedReceiver<Vec<MqttPublish>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let opts = options(&self.config)?;
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        let broker = format!("{}:{}", self.config.host, self.config.port);

        // Counts broker connections. Without a persistent session the broker
        // forgets unacknowledged messages on reconnect and reuses their
        // packet ids: an acknowledgement from an older connection could then
        // acknowledge a different, not yet durable message, so it is dropped.
        let connection = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let persistent = self.config.persistent_session;
        let acker_client = client.clone();
        let acker_connection = connection.clone();
        let acker = tokio::spawn(async move {
            while let Some(list) = acks.recv().await {
                for delivery in list {
                    if !persistent && delivery.connection != acker_connection.load(Relaxed) {
                        continue;
                    }
                    if acker_client.ack(&delivery.publish).await.is_err() {
                        return;
                    }
                }
            }
        });

        let mut backoff = Duration::from_millis(250);
        let mut connected = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    self.stats.received.fetch_add(1, Relaxed);
                    let sent = tokio::select! {
                        _ = shutdown.changed() => break,
                        sent = tx.send(Envelope::Mqtt(MqttPublish { publish, connection: connection.load(Relaxed) })) => sent,
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connection.fetch_add(1, Relaxed);
                    backoff = Duration::from_millis(250);
                    connected = true;
                    info!(broker = %broker, session_present = ack.session_present, "MQTT connected");
                    for topic in &self.config.topics {
                        // try_ keeps this loop from waiting on the request
                        // queue that only this loop drains.
                        if let Err(e) = client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                            warn!(topic = %topic, error = %e, "MQTT subscribe could not be queued");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        warn!(broker = %broker, "the broker refused a subscription; check the topic filters and the broker's ACL");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        warn!(broker = %broker, error = %e, "MQTT connection lost; unacknowledged readings will be redelivered after reconnecting");
                        connected = false;
                    } else {
                        warn!(broker = %broker, error = %e, "cannot reach the MQTT broker; retrying in {backoff:?}");
                    }
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        // Let acknowledgements of batches committed so far go out before
        // disconnecting; anything later is redelivered on the next start.
        drop(tx);
        let drain = async {
            let _ = acker.await;
        };
        let poll = async {
            loop {
                if eventloop.poll().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::select! {
                _ = drain => {}
                _ = poll => {}
            }
        })
        .await;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
        Ok(())
    }
}
