//! A loopback TCP proxy in front of a MongoDB-compatible server that can lose the answers to
//! commands of one name: the server gets the command and applies it, the client never hears
//! back (its connection is cut as the answer arrives), as when a server is killed between
//! writing and answering or a network drops a connection. The fault a client cannot tell from
//! "not applied" by its error alone.
//!
//! It reads the wire protocol only as far as it must: each message's length (header) and, for
//! an `OP_MSG` from the client, the name of its command (the first key of its body).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// `OP_MSG`, the opcode of every command a current driver sends.
const OP_MSG: i32 = 2013;

#[derive(Default)]
struct Shared {
    /// The command whose answers are lost, when one is.
    lose: Mutex<Option<String>>,
    /// Answers lost so far.
    lost: AtomicUsize,
}

/// The proxy; it stops when dropped.
pub struct LossyProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    /// Starts one on a free loopback port in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("lossy proxy");
        let port = listener.local_addr().expect("lossy proxy").port();
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_owned();
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (shared, upstream) = (shared.clone(), upstream.clone());
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&upstream).await {
                            relay(client, server, shared).await;
                        }
                    });
                }
            })
        };
        Self { port, shared, accept }
    }

    /// Its connection string.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// From now on the answers to `command` (e.g. `update`) are lost; `None` passes all again.
    pub fn lose_answers_to(&self, command: Option<&str>) {
        *self.shared.lose.lock().expect("lossy proxy") = command.map(str::to_owned);
    }

    /// Answers lost so far.
    pub fn lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The address of the server behind `uri` (its first host), as `host:port`.
pub async fn address_of(uri: &str) -> String {
    let options = mongodb::options::ClientOptions::parse(uri)
        .await
        .expect("a MongoDB URI");
    options.hosts.first().expect("a MongoDB URI names a host").to_string()
}

/// Relays one connection both ways until either side closes or an answer is lost.
async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Set when the client sent a command whose answer is to be lost.
    let doomed = Arc::new(AtomicBool::new(false));
    let requests = {
        let (shared, doomed) = (shared.clone(), doomed.clone());
        async move {
            pump(client_read, server_write, |message| {
                let lose = shared.lose.lock().expect("lossy proxy").clone();
                if lose.is_some() && command_of(message) == lose {
                    doomed.store(true, Ordering::SeqCst);
                }
                true
            })
            .await
        }
    };
    let answers = pump(server_read, client_write, |_| {
        if doomed.load(Ordering::SeqCst) {
            shared.lost.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        true
    });
    // Either side ending ends the connection: dropping both halves closes both sockets.
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}

/// Copies whole wire messages from `from` to `to` while `pass` lets each through.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut pass: impl FnMut(&[u8]) -> bool) {
    loop {
        let mut header = [0u8; 16];
        if from.read_exact(&mut header).await.is_err() {
            return;
        }
        let length = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let Some(rest) = usize::try_from(length).ok().and_then(|l| l.checked_sub(16)) else {
            return;
        };
        let mut message = header.to_vec();
        message.resize(16 + rest, 0);
        if from.read_exact(&mut message[16..]).await.is_err() {
            return;
        }
        if !pass(&message) || to.write_all(&message).await.is_err() {
            return;
        }
    }
}

/// The command an `OP_MSG` carries: the first key of its body section (kind 0), which follows
/// the header (16 bytes) and the flags (4), or `None` for any other message.
fn command_of(message: &[u8]) -> Option<String> {
    let opcode = i32::from_le_bytes(message.get(12..16)?.try_into().ok()?);
    if opcode != OP_MSG || *message.get(20)? != 0 {
        return None;
    }
    // Section kind (1 byte), then the body: its length (4), the first element's type (1), its
    // key as a C string.
    let key = message.get(26..)?;
    let end = key.iter().position(|b| *b == 0)?;
    Some(String::from_utf8_lossy(&key[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_of_an_op_msg_is_its_first_key() {
        let mut body = Vec::new();
        body.extend_from_slice(&0i32.to_le_bytes()); // body length, unread
        body.push(0x10); // int32
        body.extend_from_slice(b"update\0");
        let mut message = Vec::new();
        message.extend_from_slice(&0i32.to_le_bytes());
        message.extend_from_slice(&1i32.to_le_bytes());
        message.extend_from_slice(&0i32.to_le_bytes());
        message.extend_from_slice(&OP_MSG.to_le_bytes());
        message.extend_from_slice(&0u32.to_le_bytes());
        message.push(0);
        message.extend_from_slice(&body);
        assert_eq!(command_of(&message).as_deref(), Some("update"));
        message[12..16].copy_from_slice(&2004i32.to_le_bytes());
        assert_eq!(command_of(&message), None);
        assert_eq!(command_of(&message[..10]), None);
    }
}
