//! `herald doctor` against a MongoDB that is a standalone. The test server always runs as a
//! one-member replica set, so a stand-in speaks the wire protocol here: it answers the
//! handshake and `hello` as a standalone (no `setName`) and refuses `$changeStream` with the
//! error a standalone `mongod` gives. The doctor must fail the live feed with its clear
//! message, and say nothing of replica set members.

use std::collections::HashMap;

use bson::{doc, Document};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_MSG: i32 = 2013;

/// The answer of a standalone `mongod` 7.0 to `command`.
fn answer(command: &Document) -> Document {
    let name = command.keys().next().map(String::as_str).unwrap_or("");
    match name {
        "hello" | "isMaster" | "ismaster" => doc! {
            "helloOk": true,
            "ismaster": true,
            "isWritablePrimary": true,
            "maxBsonObjectSize": 16_777_216,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": bson::DateTime::now(),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": false,
            "ok": 1.0,
        },
        "buildInfo" | "buildinfo" => doc! {"version": "7.0.14", "ok": 1.0},
        "aggregate" => doc! {
            "ok": 0.0,
            "errmsg": "The $changeStream stage is only supported on replica sets",
            "code": 40573,
            "codeName": "Location40573",
        },
        "listIndexes" => doc! {
            "ok": 0.0,
            "errmsg": "ns does not exist: herald.messages",
            "code": 26,
            "codeName": "NamespaceNotFound",
        },
        _ => doc! {"ok": 1.0},
    }
}

fn cstring_end(bytes: &[u8]) -> usize {
    bytes.iter().position(|b| *b == 0).expect("a C string") + 1
}

async fn serve(mut socket: TcpStream) {
    loop {
        let mut header = [0u8; 16];
        if socket.read_exact(&mut header).await.is_err() {
            return;
        }
        let word = |i: usize| i32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let (length, request_id, op_code) = (word(0) as usize, word(4), word(12));
        let mut body = vec![0u8; length - 16];
        if socket.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut reply = Vec::new();
        let reply_code = match op_code {
            OP_QUERY => {
                // flags, collection name, skip, return, then the query document.
                let at = 4 + cstring_end(&body[4..]) + 8;
                let command = Document::from_reader(&body[at..]).unwrap();
                reply.extend(0i32.to_le_bytes());
                reply.extend(0i64.to_le_bytes());
                reply.extend(0i32.to_le_bytes());
                reply.extend(1i32.to_le_bytes());
                answer(&command).to_writer(&mut reply).unwrap();
                OP_REPLY
            }
            OP_MSG => {
                // flag bits, then a kind-0 section holding the command.
                assert_eq!(body[4], 0, "the command comes first");
                let command = Document::from_reader(&body[5..]).unwrap();
                reply.extend(0u32.to_le_bytes());
                reply.push(0);
                answer(&command).to_writer(&mut reply).unwrap();
                OP_MSG
            }
            other => panic!("the stand-in speaks OP_QUERY and OP_MSG, not {other}"),
        };
        let mut message = Vec::with_capacity(16 + reply.len());
        message.extend(((16 + reply.len()) as i32).to_le_bytes());
        message.extend(request_id.wrapping_add(1_000_000).to_le_bytes());
        message.extend(request_id.to_le_bytes());
        message.extend(reply_code.to_le_bytes());
        message.extend(reply);
        if socket.write_all(&message).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn doctor_fails_a_standalone_mongodb_for_the_live_feed_with_what_to_do() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket));
        }
    });
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mut vars = HashMap::new();
    vars.insert("HERALD__MONGO__URI".to_owned(), uri);
    vars.insert("HERALD__REDIS__URL".to_owned(), test_support::redis_url());
    let output = tokio::task::spawn_blocking(move || crate::helpers::herald(&vars).arg("doctor").output().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{text}");
    assert!(!output.status.success(), "a standalone fails the doctor: {text}");
    assert!(
        text.contains("[ok  ] mongodb        reachable, server 7.0.14"),
        "it is reachable: {text}"
    );
    assert!(
        text.contains("[FAIL] mongodb        change streams cannot open")
            && text.contains("needs a replica set; run mongod with --replSet"),
        "the live feed is refused with what to do: {text}"
    );
    assert!(!text.contains("members:"), "a standalone has no members: {text}");
}
