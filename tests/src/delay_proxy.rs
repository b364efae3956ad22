//! A TCP proxy that holds every byte for a fixed time in each direction:
//! `edge-bench run --kafka-rtt-ms` puts it between the agent and Kafka, as
//! far away as a broker in a cloud region is from a gateway. Bandwidth is
//! not limited; order is kept.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Chunks in flight per direction of a connection; a full queue holds the
/// reader back, as a full network path would.
const QUEUED_CHUNKS: usize = 4096;

/// A running proxy. Dropped, it stops taking connections; open ones end
/// when either side closes them (the agent's, when the run stops it).
pub struct DelayProxy {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `listen` and forwards each connection to `upstream`, every
/// byte `one_way` later than it arrived, in both directions.
pub async fn start(
    listen: &str,
    upstream: String,
    one_way: Duration,
) -> anyhow::Result<DelayProxy> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("the delay proxy cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(e) => {
                    eprintln!("delay proxy: stops accepting connections: {e}");
                    return;
                }
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                match TcpStream::connect(&upstream).await {
                    Ok(server) => {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::spawn(pump(client_read, server_write, one_way));
                        tokio::spawn(pump(server_read, client_write, one_way));
                    }
                    Err(e) => eprintln!("delay proxy: cannot reach {upstream}: {e}"),
                }
            });
        }
    });
    Ok(DelayProxy { addr, task })
}

/// Copies `from` to `to`, each chunk `delay` after it was read. Ends when
/// either side closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if queue
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(queue);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes come through whole and in order, and a round trip takes at
    /// least twice the one-way delay.
    #[tokio::test]
    async fn bytes_arrive_in_order_and_late() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let delay = Duration::from_millis(20);
        let proxy = start("127.0.0.1:0", echo_addr.to_string(), delay).await?;
        let mut c = TcpStream::connect(proxy.addr).await?;
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        let (mut r, mut w) = c.split();
        let write = async {
            w.write_all(&sent).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (wrote, read) = tokio::join!(write, read);
        wrote?;
        read?;
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
        assert!(
            started.elapsed() >= 2 * delay,
            "round trip in {:?}, under twice {delay:?}",
            started.elapsed()
        );
        Ok(())
    }
}
