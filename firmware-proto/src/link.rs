//! The sans-IO link layer: go-back-N with cumulative acknowledgements.
//!
//! Neither side does I/O or reads a clock. The caller feeds received bytes
//! and the current time in (`handle_*`), and takes frames to write, events
//! and the next deadline out (`poll_*`). The device firmware and the
//! gateway (and the gateway's device simulator) run this same code.
//!
//! * The device keeps up to `W` unacknowledged readings. It transmits them
//!   in order; when no acknowledgement arrives within the ack timeout it
//!   goes back and retransmits from the oldest, with exponential backoff.
//! * The gateway takes readings strictly in sequence: a duplicate is
//!   re-acknowledged, a reading after a gap is dropped (the device resends
//!   it), so no reading is ever delivered twice or out of order.
//! * The gateway acknowledges a reading only when the application says it
//!   is durable ([`GatewayLink::handle_durable`]).
//! * A new boot epoch in `Hello` resets the gateway's state for that
//!   device; a reading from an unknown device or epoch is answered with
//!   `Error { NotIdentified }`, and the device says `Hello` again.
//!
//! # An embassy task driving the device side
//!
//! The firmware owns the UART and the clock; the link only sees bytes and
//! instants. `Instant::now()` is embassy's clock, chosen at link time:
//!
//! ```no_run
//! use embassy_time::Instant;
//! use firmware_proto::MAX_FRAME_SIZE_BYTES;
//! use firmware_proto::link::{DeviceEvent, DeviceLink};
//! use firmware_proto::message::Reading;
//!
//! /// What the task needs from the board's UART (embedded-io-async and
//! /// embassy's `with_deadline` give the same).
//! pub trait Uart {
//!     async fn write_all(&mut self, bytes: &[u8]);
//!     /// Reads what has arrived; returns 0 once `deadline` passes.
//!     async fn read_until(&mut self, buf: &mut [u8], deadline: Instant) -> usize;
//! }
//!
//! // In firmware: `#[embassy_executor::task] async fn link_task(uart: BoardUart, ..)`.
//! pub async fn link_task<U: Uart>(mut uart: U, mut link: DeviceLink, mut sample: impl FnMut() -> Option<Reading>) -> ! {
//!     let mut frame = [0u8; MAX_FRAME_SIZE_BYTES];
//!     let mut rx = [0u8; 64];
//!     loop {
//!         let now = Instant::now();
//!         if link.can_send()
//!             && let Some(mut reading) = sample()
//!         {
//!             reading.timestamp_ms = link.unix_time_ms(now).unwrap_or(0);
//!             let _ = link.send(reading, now);
//!         }
//!         link.handle_timeout(now);
//!         while let Some(n) = link.poll_transmit(now, &mut frame) {
//!             uart.write_all(&frame[..n]).await;
//!         }
//!         let n = uart.read_until(&mut rx, link.poll_timeout()).await;
//!         link.handle_bytes(&rx[..n], Instant::now());
//!         while let Some(event) = link.poll_event() {
//!             if let DeviceEvent::Acked { seq } = event {
//!                 // Readings up to `seq` are safe: free their flash slots.
//!                 let _ = seq;
//!             }
//!         }
//!     }
//! }
//! ```

use embassy_time::{Duration, Instant};
use heapless::{Deque, Vec};

use crate::PROTOCOL_VERSION;
use crate::frame::{Deframer, FrameError, encode_frame};
use crate::message::{Config, DeviceId, ErrorCode, Hello, Message, Reading};

/// Wait this long for an acknowledgement before retransmitting.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(150);
/// Cap of the retransmission backoff.
pub const MAX_RETRANSMIT_BACKOFF: Duration = Duration::from_secs(2);
/// A device says `Hello` this often until the gateway answers.
pub const HELLO_INTERVAL: Duration = Duration::from_millis(300);
/// An idle device sends a heartbeat this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// The gateway reports a device silent for this long as down.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(15);
/// Default device window: unacknowledged readings held by the device.
pub const DEFAULT_WINDOW: usize = 16;

/// What the device application learns from its link.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceEvent {
    /// The gateway answered `Hello` with its settings: the link is up.
    Configured(Config),
    /// The gateway clock; see [`DeviceLink::unix_time_ms`].
    TimeSynced { unix_ms: u64 },
    /// Readings up to `seq` are durable at the gateway.
    Acked { seq: u32 },
    /// The gateway stored reading `seq` but refused it.
    Refused { seq: u32, code: ErrorCode },
    /// The gateway does not speak our protocol version.
    VersionRefused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceState {
    Connecting,
    Established,
}

/// The device side of a link.
pub struct DeviceLink<const W: usize = DEFAULT_WINDOW> {
    address: u8,
    device_id: DeviceId,
    firmware_version: u32,
    boot_epoch: u32,
    state: DeviceState,
    deframer: Deframer,
    window: Deque<Reading, W>,
    next_seq: u32,
    /// Index in `window` of the next reading to transmit.
    cursor: usize,
    retransmit_at: Option<Instant>,
    backoff: Duration,
    hello_at: Instant,
    heartbeat_at: Instant,
    booted_at: Instant,
    /// Unix ms minus device ms, once synced.
    clock_offset_ms: Option<i64>,
    events: Deque<DeviceEvent, 8>,
    /// Retransmission rounds so far (for diagnostics).
    pub retransmissions: u32,
}

impl<const W: usize> DeviceLink<W> {
    pub fn new(
        address: u8,
        device_id: DeviceId,
        firmware_version: u32,
        boot_epoch: u32,
        now: Instant,
    ) -> Self {
        Self {
            address,
            device_id,
            firmware_version,
            boot_epoch,
            state: DeviceState::Connecting,
            deframer: Deframer::new(),
            window: Deque::new(),
            next_seq: 1,
            cursor: 0,
            retransmit_at: None,
            backoff: ACK_TIMEOUT,
            hello_at: now,
            heartbeat_at: now + HEARTBEAT_INTERVAL,
            booted_at: now,
            clock_offset_ms: None,
            events: Deque::new(),
            retransmissions: 0,
        }
    }

    /// The boot epoch readings are currently sent under.
    pub fn boot_epoch(&self) -> u32 {
        self.boot_epoch
    }

    /// Sets the next sequence number (tests of the wrap-around).
    #[doc(hidden)]
    pub fn set_next_seq(&mut self, seq: u32) {
        self.next_seq = seq;
    }

    pub fn is_established(&self) -> bool {
        self.state == DeviceState::Established
    }

    /// Readings held and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.window.len()
    }

    /// Room for more readings.
    pub fn can_send(&self) -> bool {
        !self.window.is_full()
    }

    /// Unix time in ms from the gateway's `TimeSync`, if received.
    pub fn unix_time_ms(&self, now: Instant) -> Option<u64> {
        let offset = self.clock_offset_ms?;
        Some(millis_i64(now).saturating_add(offset).max(0) as u64)
    }

    /// Queues a reading; the link assigns its `seq` and `boot_epoch` and
    /// returns the seq. Hands the reading back when the window is full.
    pub fn send(&mut self, mut reading: Reading, now: Instant) -> Result<u32, Reading> {
        if self.window.is_full() {
            return Err(reading);
        }
        if self.next_seq == 0 {
            // 2^32 readings in one boot: the gateway keys on (epoch, seq),
            // so start a new epoch once everything of this one is safe.
            if !self.window.is_empty() {
                return Err(reading);
            }
            self.boot_epoch = self.boot_epoch.wrapping_add(1);
            self.next_seq = 1;
            self.state = DeviceState::Connecting;
            self.hello_at = now;
            self.cursor = 0;
            self.retransmit_at = None;
        }
        reading.seq = self.next_seq;
        reading.boot_epoch = self.boot_epoch;
        let seq = reading.seq;
        // Cannot fail: checked for room above.
        let _ = self.window.push_back(reading);
        self.next_seq = self.next_seq.wrapping_add(1);
        let _ = now;
        Ok(seq)
    }

    /// Feeds bytes received from the gateway.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant) {
        for &b in bytes {
            if let Some(Ok((address, message))) = self.deframer.push(b)
                && address == self.address
            {
                self.handle_message(message, now);
            }
        }
    }

    fn handle_message(&mut self, message: Message, now: Instant) {
        match message {
            Message::Config(config) => {
                if self.state == DeviceState::Connecting {
                    trace!("link established");
                    self.state = DeviceState::Established;
                    self.cursor = 0;
                    self.backoff = ACK_TIMEOUT;
                    // Armed by poll_transmit when the first reading goes out.
                    self.retransmit_at = None;
                }
                self.push_event(DeviceEvent::Configured(config));
            }
            Message::TimeSync { unix_ms } => {
                // A clock beyond year 292 million is not a clock: ignore it
                // rather than overflow.
                if let Ok(unix) = i64::try_from(unix_ms) {
                    self.clock_offset_ms = Some(unix.saturating_sub(millis_i64(now)));
                    self.push_event(DeviceEvent::TimeSynced { unix_ms });
                }
            }
            Message::Ack {
                boot_epoch,
                cumulative,
            } if boot_epoch == self.boot_epoch => {
                let mut popped = 0;
                while self
                    .window
                    .front()
                    .is_some_and(|r| seq_le(r.seq, cumulative))
                {
                    self.window.pop_front();
                    popped += 1;
                }
                if popped > 0 {
                    self.cursor = self.cursor.saturating_sub(popped);
                    self.backoff = ACK_TIMEOUT;
                    self.retransmit_at = (!self.window.is_empty()).then(|| now + self.backoff);
                    self.push_event(DeviceEvent::Acked { seq: cumulative });
                }
            }
            Message::Nack {
                boot_epoch,
                seq,
                code: ErrorCode::Missing,
            } if boot_epoch == self.boot_epoch => {
                // Fast retransmission: resend from the first missing reading
                // now instead of waiting for the timer.
                if let Some(index) = self.window.iter().position(|r| r.seq == seq)
                    && index < self.cursor
                {
                    self.cursor = index;
                    self.retransmissions += 1;
                }
            }
            Message::Nack {
                boot_epoch,
                seq,
                code,
            } if boot_epoch == self.boot_epoch => {
                self.push_event(DeviceEvent::Refused { seq, code });
            }
            Message::Error {
                code: ErrorCode::NotIdentified,
            } => {
                warn!("gateway does not know this device; saying hello again");
                self.state = DeviceState::Connecting;
                self.hello_at = now;
                self.cursor = 0;
                self.retransmit_at = None;
            }
            Message::Error {
                code: ErrorCode::UnsupportedVersion,
            } => {
                self.push_event(DeviceEvent::VersionRefused);
            }
            _ => {}
        }
    }

    fn push_event(&mut self, event: DeviceEvent) {
        if self.events.is_full() {
            self.events.pop_front();
        }
        let _ = self.events.push_back(event);
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// Encodes the next frame to write into `buf`; returns its length.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let message = match self.state {
            DeviceState::Connecting if now >= self.hello_at => {
                self.hello_at = now + HELLO_INTERVAL;
                Message::Hello(Hello {
                    device_id: self.device_id.clone(),
                    firmware_version: self.firmware_version,
                    protocol_version: PROTOCOL_VERSION,
                    boot_epoch: self.boot_epoch,
                    next_seq: self.window.front().map_or(self.next_seq, |r| r.seq),
                })
            }
            DeviceState::Established if self.cursor < self.window.len() => {
                let reading = self.window.iter().nth(self.cursor)?.clone();
                self.cursor += 1;
                if self.retransmit_at.is_none() {
                    self.retransmit_at = Some(now + self.backoff);
                }
                Message::Reading(reading)
            }
            _ if now >= self.heartbeat_at => Message::Heartbeat {
                uptime_ms: (now - self.booted_at).as_millis(),
            },
            _ => return None,
        };
        self.heartbeat_at = now + HEARTBEAT_INTERVAL;
        encode_frame(self.address, &message, buf).ok()
    }

    /// When [`Self::handle_timeout`] must be called next. While frames are
    /// waiting for [`Self::poll_transmit`], that is now (the epoch).
    pub fn poll_timeout(&self) -> Instant {
        if self.state == DeviceState::Established && self.cursor < self.window.len() {
            return Instant::from_ticks(0);
        }
        let mut at = self.heartbeat_at;
        if self.state == DeviceState::Connecting {
            at = at.min(self.hello_at);
        }
        if let Some(r) = self.retransmit_at {
            at = at.min(r);
        }
        at
    }

    /// Advances timers: retransmits from the oldest unacknowledged reading
    /// when its acknowledgement is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(at) = self.retransmit_at
            && now >= at
        {
            if self.window.is_empty() {
                self.retransmit_at = None;
            } else {
                self.cursor = 0;
                self.retransmissions += 1;
                self.backoff = (self.backoff * 2).min(MAX_RETRANSMIT_BACKOFF);
                self.retransmit_at = Some(now + self.backoff);
            }
        }
    }
}

fn millis_i64(at: Instant) -> i64 {
    i64::try_from(at.as_millis()).unwrap_or(i64::MAX)
}

/// `a <= b` in sequence space (wrapping after 2^32 readings).
fn seq_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < (1 << 31)
}

/// What the gateway application learns from a port.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayEvent {
    /// A device (re)started its link.
    Hello { address: u8, hello: Hello },
    /// The next reading of a device, in order, exactly once per epoch.
    /// Call [`GatewayLink::handle_durable`] once it is safe.
    Reading {
        address: u8,
        device_id: DeviceId,
        reading: Reading,
    },
    /// A frame that could not be read; the link resynchronised.
    FrameError(FrameError),
    /// A device was silent for [`LINK_TIMEOUT`].
    DeviceSilent { address: u8, device_id: DeviceId },
}

struct Peer {
    address: u8,
    device_id: DeviceId,
    boot_epoch: u32,
    /// Next seq to deliver.
    expected: u32,
    /// Highest seq the application made durable.
    durable: u32,
    ack_due: bool,
    /// A `Missing` was sent for the current gap.
    gap_reported: bool,
    last_heard: Instant,
    silent_reported: bool,
}

/// The gateway side of one serial port (one or more devices on a bus,
/// told apart by their address). `D` bounds the devices per port.
pub struct GatewayLink<const D: usize = 32> {
    deframer: Deframer,
    peers: Vec<Peer, D>,
    config: Config,
    /// Control frames waiting to be sent.
    outbox: Deque<(u8, Message), 16>,
    events: Deque<GatewayEvent, 64>,
    /// Frame errors seen (also reported as events while there is room).
    pub frame_errors: u32,
    /// Duplicate readings re-acknowledged.
    pub duplicates: u32,
    /// Readings dropped after a gap or with the event queue full (resent by
    /// the device).
    pub out_of_order: u32,
}

impl<const D: usize> GatewayLink<D> {
    pub fn new(config: Config) -> Self {
        Self {
            deframer: Deframer::new(),
            peers: Vec::new(),
            config,
            outbox: Deque::new(),
            events: Deque::new(),
            frame_errors: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }

    /// Feeds bytes read from the port. `unix_ms` is the gateway clock, sent
    /// to devices that say `Hello`.
    pub fn handle_bytes(&mut self, bytes: &[u8], now: Instant, unix_ms: u64) {
        for &b in bytes {
            match self.deframer.push(b) {
                None => {}
                Some(Ok((address, message))) => self.handle_message(address, message, now, unix_ms),
                Some(Err(e)) => {
                    self.frame_errors = self.frame_errors.wrapping_add(1);
                    if let FrameError::UnsupportedVersion { address, .. } = e {
                        self.queue(
                            address,
                            Message::Error {
                                code: ErrorCode::UnsupportedVersion,
                            },
                        );
                    }
                    if !self.events.is_full() {
                        let _ = self.events.push_back(GatewayEvent::FrameError(e));
                    }
                }
            }
        }
    }

    fn queue(&mut self, address: u8, message: Message) {
        if self
            .outbox
            .iter()
            .any(|(a, m)| *a == address && *m == message)
        {
            return;
        }
        if self.outbox.is_full() {
            self.outbox.pop_front();
        }
        let _ = self.outbox.push_back((address, message));
    }

    fn peer(&mut self, address: u8) -> Option<&mut Peer> {
        self.peers.iter_mut().find(|p| p.address == address)
    }

    fn handle_message(&mut self, address: u8, message: Message, now: Instant, unix_ms: u64) {
        match message {
            Message::Hello(hello) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    self.queue(
                        address,
                        Message::Error {
                            code: ErrorCode::UnsupportedVersion,
                        },
                    );
                    return;
                }
                let start = hello.next_seq;
                match self.peers.iter_mut().find(|p| p.address == address) {
                    Some(p)
                        if p.boot_epoch == hello.boot_epoch && p.device_id == hello.device_id =>
                    {
                        // Same boot: keep what was delivered; the device may
                        // resend readings we already have (duplicates).
                        if seq_le(p.expected, start) {
                            p.expected = start;
                            p.durable = start.wrapping_sub(1);
                        }
                        p.last_heard = now;
                        p.silent_reported = false;
                        p.ack_due = true;
                    }
                    Some(p) => {
                        p.device_id = hello.device_id.clone();
                        p.boot_epoch = hello.boot_epoch;
                        p.expected = start;
                        p.durable = start.wrapping_sub(1);
                        p.last_heard = now;
                        p.silent_reported = false;
                        p.gap_reported = false;
                        p.ack_due = true;
                    }
                    None => {
                        let peer = Peer {
                            address,
                            device_id: hello.device_id.clone(),
                            boot_epoch: hello.boot_epoch,
                            expected: start,
                            durable: start.wrapping_sub(1),
                            ack_due: true,
                            gap_reported: false,
                            last_heard: now,
                            silent_reported: false,
                        };
                        if self.peers.push(peer).is_err() {
                            self.queue(
                                address,
                                Message::Error {
                                    code: ErrorCode::Busy,
                                },
                            );
                            return;
                        }
                    }
                }
                self.queue(address, Message::Config(self.config));
                self.queue(address, Message::TimeSync { unix_ms });
                if !self.events.is_full() {
                    let _ = self
                        .events
                        .push_back(GatewayEvent::Hello { address, hello });
                }
            }
            Message::Reading(reading) => {
                let events_full = self.events.is_full();
                let Some(p) = self
                    .peer(address)
                    .filter(|p| p.boot_epoch == reading.boot_epoch)
                else {
                    self.queue(
                        address,
                        Message::Error {
                            code: ErrorCode::NotIdentified,
                        },
                    );
                    return;
                };
                p.last_heard = now;
                p.silent_reported = false;
                if reading.seq == p.expected && !events_full {
                    p.expected = p.expected.wrapping_add(1);
                    p.gap_reported = false;
                    let device_id = p.device_id.clone();
                    let _ = self.events.push_back(GatewayEvent::Reading {
                        address,
                        device_id,
                        reading,
                    });
                } else if seq_le(reading.seq, p.expected.wrapping_sub(1)) {
                    p.ack_due = true;
                    self.duplicates = self.duplicates.wrapping_add(1);
                } else {
                    let missing = (!p.gap_reported && !events_full).then(|| {
                        p.gap_reported = true;
                        Message::Nack {
                            boot_epoch: p.boot_epoch,
                            seq: p.expected,
                            code: ErrorCode::Missing,
                        }
                    });
                    self.out_of_order = self.out_of_order.wrapping_add(1);
                    if let Some(nack) = missing {
                        self.queue(address, nack);
                    }
                }
            }
            Message::Heartbeat { .. } => {
                if let Some(p) = self.peer(address) {
                    p.last_heard = now;
                    p.silent_reported = false;
                    p.ack_due = true;
                } else {
                    self.queue(
                        address,
                        Message::Error {
                            code: ErrorCode::NotIdentified,
                        },
                    );
                }
            }
            // Gateway-to-device messages arriving here are ignored.
            _ => {}
        }
    }

    /// The application made every reading of `address`/`boot_epoch` up to
    /// `seq` durable: acknowledge them.
    pub fn handle_durable(&mut self, address: u8, boot_epoch: u32, seq: u32) {
        if let Some(p) = self.peer(address)
            && p.boot_epoch == boot_epoch
            && seq_le(p.durable, seq)
            && seq_le(seq, p.expected.wrapping_sub(1))
        {
            p.durable = seq;
            p.ack_due = true;
        }
    }

    /// The application stored reading `seq` but refused it: tell the device.
    pub fn handle_refused(&mut self, address: u8, boot_epoch: u32, seq: u32, code: ErrorCode) {
        self.queue(
            address,
            Message::Nack {
                boot_epoch,
                seq,
                code,
            },
        );
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }

    /// Encodes the next frame to write into `buf`; returns its length.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<usize> {
        if let Some((address, message)) = self.outbox.pop_front() {
            return encode_frame(address, &message, buf).ok();
        }
        let p = self.peers.iter_mut().find(|p| p.ack_due)?;
        p.ack_due = false;
        let message = Message::Ack {
            boot_epoch: p.boot_epoch,
            cumulative: p.durable,
        };
        encode_frame(p.address, &message, buf).ok()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter(|p| !p.silent_reported)
            .map(|p| p.last_heard + LINK_TIMEOUT)
            .min()
    }

    /// Reports devices that fell silent.
    pub fn handle_timeout(&mut self, now: Instant) {
        for p in self.peers.iter_mut() {
            if !p.silent_reported && now >= p.last_heard + LINK_TIMEOUT && !self.events.is_full() {
                p.silent_reported = true;
                let _ = self.events.push_back(GatewayEvent::DeviceSilent {
                    address: p.address,
                    device_id: p.device_id.clone(),
                });
            }
        }
    }
}
