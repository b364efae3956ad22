//! Serial source: one driver task per port, speaking firmware-proto.
//!
//! The link state machine ([`firmware_proto::link::GatewayLink`]) does the
//! protocol; this task only moves bytes, time and acknowledgements: it feeds
//! what it reads into the link, forwards readings to the batch writer,
//! writes the link's frames to the port, and passes acknowledgements back
//! once the batch writer made a reading durable. A port that disappears (a
//! USB adapter unplugged) is reopened with backoff.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use firmware_proto::MAX_FRAME_SIZE_BYTES;
use firmware_proto::link::{GatewayEvent, GatewayLink, HEARTBEAT_INTERVAL};
use firmware_proto::message::{Config as LinkConfig, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant as TokioInstant;
use tokio_serial::SerialPortBuilderExt;
use tracing::{debug, info, warn};

use crate::config::{FlowControl, Parity, SerialSourceConfig};
use crate::pipeline::{Envelope, SerialAck, now_ms};
use crate::stats::Stats;

/// Counters of one port.
#[derive(Debug, Default)]
pub struct SerialPortStats {
    pub bytes_read: AtomicU64,
    pub frame_errors: AtomicU64,
    pub reopenings: AtomicU64,
}

pub struct SerialSource {
    pub config: SerialSourceConfig,
    pub index: usize,
    pub stats: Arc<Stats>,
    pub port_stats: Arc<SerialPortStats>,
}

enum Ended {
    Shutdown,
    PortLost(String),
}

fn open(config: &SerialSourceConfig) -> tokio_serial::Result<tokio_serial::SerialStream> {
    let path = config.path.to_string_lossy();
    let builder = tokio_serial::new(path.as_ref(), config.baud_rate)
        .parity(match config.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(if config.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .data_bits(if config.data_bits == 7 {
            tokio_serial::DataBits::Seven
        } else {
            tokio_serial::DataBits::Eight
        })
        .flow_control(match config.flow_control {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Software => tokio_serial::FlowControl::Software,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        });
    #[allow(unused_mut)]
    let mut port = builder.open_native_async()?;
    #[cfg(unix)]
    {
        // Two agents reading one port would each see half the bytes.
        let _ = port.set_exclusive(true);
    }
    Ok(port)
}

impl SerialSource {
    pub async fn run(
        self,
        tx: mpsc::Sender<Envelope>,
        mut acks: mpsc::UnboundedReceiver<Vec<SerialAck>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let path = self.config.path.display().to_string();
        let max_backoff = Duration::from_secs(self.config.reopen_backoff_max_seconds);
        let mut backoff = Duration::from_millis(200);
        let mut logged_missing = false;
        loop {
            let port = match open(&self.config) {
                Ok(port) => port,
                Err(e) => {
                    if !logged_missing {
                        warn!(port = %path, error = %e, "cannot open serial port; retrying until it appears");
                        logged_missing = true;
                    }
                    tokio::select! {
                        _ = shutdown.changed() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            };
            info!(port = %path, baud = self.config.baud_rate, "serial port open");
            logged_missing = false;
            backoff = Duration::from_millis(200);
            match self.drive(port, &tx, &mut acks, &mut shutdown).await {
                Ended::Shutdown => return Ok(()),
                Ended::PortLost(why) => {
                    self.port_stats.reopenings.fetch_add(1, Relaxed);
                    warn!(port = %path, error = %why, "serial port lost; devices keep unacknowledged readings and resend them after reopening");
                }
            }
        }
    }

    /// Runs one open port until it fails or the agent stops.
    async fn drive(
        &self,
        mut port: tokio_serial::SerialStream,
        tx: &mpsc::Sender<Envelope>,
        acks: &mut mpsc::UnboundedReceiver<Vec<SerialAck>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let mut link: GatewayLink<32> = GatewayLink::new(LinkConfig {
            sampling_interval_ms: self.config.sampling_interval_ms,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        });
        let started = TokioInstant::now();
        let link_now = || embassy_time::Instant::from_micros(started.elapsed().as_micros() as u64);
        let mut read_buf = [0u8; 1024];
        let mut out = [0u8; MAX_FRAME_SIZE_BYTES];
        // Acknowledgements for a previous incarnation of the port are
        // meaningless now: the devices say hello again and resend.
        while acks.try_recv().is_ok() {}
        loop {
            // Write whatever the link wants to say.
            while let Some(n) = link.poll_transmit(&mut out) {
                // A line stalled by flow control must not block shutdown.
                tokio::select! {
                    _ = shutdown.changed() => return Ended::Shutdown,
                    written = port.write_all(&out[..n]) => if let Err(e) = written {
                        return Ended::PortLost(e.to_string());
                    },
                }
            }
            // Hand readings to the batch writer (waits when it is full:
            // backpressure; unacknowledged devices simply resend later).
            while let Some(event) = link.poll_event() {
                match event {
                    GatewayEvent::Reading {
                        address,
                        device_id,
                        reading,
                    } => {
                        self.stats.received.fetch_add(1, Relaxed);
                        let env = Envelope::Serial {
                            port: self.index,
                            address,
                            device_id: device_id.as_str().to_string(),
                            reading,
                        };
                        tokio::select! {
                            _ = shutdown.changed() => return Ended::Shutdown,
                            sent = tx.send(env) => if sent.is_err() { return Ended::Shutdown },
                        }
                    }
                    GatewayEvent::Hello { address, hello } => info!(
                        port = %self.config.path.display(),
                        address,
                        device = %hello.device_id.as_str(),
                        boot_epoch = hello.boot_epoch,
                        firmware = hello.firmware_version,
                        "device said hello"
                    ),
                    GatewayEvent::FrameError(e) => {
                        self.port_stats.frame_errors.fetch_add(1, Relaxed);
                        debug!(port = %self.config.path.display(), error = %e, "bad frame; resynchronised");
                    }
                    GatewayEvent::DeviceSilent { address, device_id } => warn!(
                        port = %self.config.path.display(),
                        address,
                        device = %device_id.as_str(),
                        "device silent"
                    ),
                }
            }
            let deadline = link
                .poll_timeout()
                .map(|at| started + Duration::from_micros(at.as_micros()))
                .unwrap_or_else(|| TokioInstant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.changed() => return Ended::Shutdown,
                read = port.read(&mut read_buf) => match read {
                    Ok(0) => return Ended::PortLost("end of file".into()),
                    Ok(n) => {
                        self.port_stats.bytes_read.fetch_add(n as u64, Relaxed);
                        link.handle_bytes(&read_buf[..n], link_now(), now_ms().max(0) as u64);
                    }
                    Err(e) => return Ended::PortLost(e.to_string()),
                },
                Some(list) = acks.recv() => {
                    for ack in list {
                        link.handle_durable(ack.address, ack.boot_epoch, ack.seq);
                        if ack.refused {
                            link.handle_refused(ack.address, ack.boot_epoch, ack.seq, ErrorCode::Rejected);
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => link.handle_timeout(link_now()),
            }
        }
    }
}

/// Whether a serial device path exists (for `doctor` and error messages).
pub fn port_present(path: &Path) -> bool {
    path.exists()
}
