//! `RemoteScorer`'s HTTP client against tiny hand-rolled loopback servers: timeouts,
//! chunked answers, the answer size cap, IPv6 literals, bad URLs, error messages and
//! connection reuse. No model: the servers answer canned JSON.
#![allow(clippy::unwrap_used, reason = "tests: a failed unwrap is a failed test")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::policy_tokenizer;
use specrej_core::{Response, Scorer, block_on_ready};
use specrej_reward::{MAX_ANSWER_BYTES, RemoteScorer, ScoreRequest};

const QUESTION: &str = "What is the best way to learn?";
/// Every test's requests are bounded by this (the timeout test uses its own, shorter one).
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

fn scorer(url: &str) -> RemoteScorer {
    RemoteScorer::new(url, policy_tokenizer(), QUESTION).unwrap().with_timeout(TEST_TIMEOUT)
}

/// Reads one HTTP request (head, then a `Content-Length` body); `None` at a clean EOF.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<ScoreRequest> {
    let mut length = None;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if first {
            assert!(line.starts_with("POST /score HTTP/1.1"), "{line:?}");
            first = false;
            continue;
        }
        if line == "\r\n" {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().unwrap());
        }
    }
    let mut body = vec![0; length.expect("the client sends Content-Length")];
    reader.read_exact(&mut body).unwrap();
    Some(serde_json::from_slice(&body).unwrap())
}

/// A listener on 127.0.0.1 and its URL.
fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    (listener, url)
}

/// Accepts one connection, reads one request, and hands both to `answer` on a thread.
fn serve_one(
    listener: TcpListener,
    answer: impl FnOnce(TcpStream, ScoreRequest) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TEST_TIMEOUT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let request = read_request(&mut reader).expect("a request");
        answer(stream, request);
    })
}

/// `{"rewards": [0.5, 1.5, ...], "tokens_processed": 7}` for `n` responses.
fn answer_json(n: usize) -> String {
    let rewards: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
    serde_json::json!({ "rewards": rewards, "tokens_processed": 7 }).to_string()
}

#[test]
fn a_server_that_never_answers_times_out() {
    let (listener, url) = listen();
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let server = serve_one(listener, move |mut stream, _| {
        // Hold the connection open, silent, until the client gives up and closes it.
        let mut buf = [0; 64];
        while !matches!(stream.read(&mut buf), Ok(0) | Err(_)) {}
        flag.store(true, Ordering::SeqCst);
    });
    let mut remote = scorer(&url).with_timeout(Duration::from_secs(1));
    let start = Instant::now();
    let e = remote.score_texts(&[(0, "an answer")]).unwrap_err().to_string();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(900), "gave up after {waited:?}: {e}");
    assert!(waited < Duration::from_secs(5), "took {waited:?}: {e}");
    assert!(e.contains(&url) && e.contains("within 1s"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    drop(remote);
    server.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn a_chunked_answer_is_decoded() {
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, request| {
        assert_eq!(request.prompt, QUESTION);
        let json = answer_json(request.responses.len());
        let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for piece in json.as_bytes().chunks(5) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        // In several writes, so the client sees the chunks arrive in pieces.
        for part in out.chunks(7) {
            stream.write_all(part).unwrap();
            stream.flush().unwrap();
        }
    });
    // Through the Scorer trait: the policy's ids are detokenized and sent as text.
    let mut remote = scorer(&url);
    let policy = policy_tokenizer();
    let ids: Vec<Vec<u32>> =
        ["the answer", "another"].iter().map(|t| policy.encode(t, false).unwrap()).collect();
    let responses: Vec<Response<'_>> = ids
        .iter()
        .enumerate()
        .map(|(row, tokens)| Response { row: row as u32 * 3, tokens })
        .collect();
    let scored = block_on_ready(remote.score(&[], &responses)).unwrap();
    assert_eq!(scored.rewards, vec![0.5, 1.5]);
    assert_eq!(scored.tokens_processed, 7);
    server.join().unwrap();
}

#[test]
fn an_answer_over_the_cap_is_an_error() {
    // A Content-Length over the cap: refused before reading (nothing allocated for it).
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, _| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            1u64 << 40
        );
        stream.write_all(head.as_bytes()).unwrap();
        let _ = stream.write_all(b"{\"rewards\": [");
        let _ = stream.shutdown(Shutdown::Write);
    });
    let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(
        e.contains(&url) && e.contains("limit") && e.contains(&MAX_ANSWER_BYTES.to_string()),
        "{e}"
    );
    server.join().unwrap();

    // An endless chunked body: the client stops reading at the cap. The server stops by
    // itself after 16 times the cap if the client never does.
    let (listener, url) = listen();
    let written = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&written);
    let server = serve_one(listener, move |mut stream, _| {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        let chunk = [b' '; 1 << 16];
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        while count.load(Ordering::SeqCst) < 16 * MAX_ANSWER_BYTES {
            if stream.write_all(&frame).is_err() {
                break;
            }
            count.fetch_add(frame.len(), Ordering::SeqCst);
        }
    });
    let mut remote = scorer(&url);
    let start = Instant::now();
    let e = remote.score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("limit"), "{e}");
    assert!(start.elapsed() < TEST_TIMEOUT, "{e}");
    drop(remote);
    server.join().unwrap();
    let written = written.load(Ordering::SeqCst);
    // What the client read plus the loopback socket buffers, far below the server's stop.
    assert!(written < 4 * MAX_ANSWER_BYTES, "the client read on: {written} bytes written");
}

#[test]
fn error_answers_give_the_servers_message() {
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, _| {
        let body = r#"{"error": "reward model: out of memory"}"#;
        let head = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    });
    let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(e.contains(&url) && e.ends_with("HTTP 500: reward model: out of memory"), "{e}");
    server.join().unwrap();

    // Not JSON, chunked: the text itself, on one line.
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, _| {
        let head = "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(b"a\r\nno such\npa\r\n2\r\nth\r\n0\r\n\r\n").unwrap();
    });
    let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(e.contains(&url) && e.ends_with("HTTP 404: no such path"), "{e}");
    server.join().unwrap();

    // A wrong number of rewards, and garbage instead of HTTP.
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, _| {
        let body = answer_json(1);
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
    });
    let e = scorer(&url).score_texts(&[(0, "a"), (1, "b")]).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("1 rewards for 2 responses"), "{e}");
    server.join().unwrap();
    let (listener, url) = listen();
    let server = serve_one(listener, |mut stream, _| {
        stream.write_all(b"\x00\x01 not http at all\r\n\r\n").unwrap();
    });
    let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(e.contains(&url) && !e.contains('\n'), "{e}");
    server.join().unwrap();

    // Nobody listening: a connection error naming the URL.
    let (listener, url) = listen();
    drop(listener);
    let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("refused"), "{e}");
}

#[test]
fn ipv6_loopback_urls_work() {
    match TcpListener::bind("[::1]:0") {
        Ok(listener) => {
            let port = listener.local_addr().unwrap().port();
            let url = format!("http://[::1]:{port}/score");
            let server = serve_one(listener, |mut stream, request| {
                let body = answer_json(request.responses.len());
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(body.as_bytes()).unwrap();
            });
            let scored = scorer(&url).score_texts(&[(4, "a"), (9, "b"), (2, "c")]).unwrap();
            assert_eq!(scored.rewards, vec![0.5, 1.5, 2.5]);
            server.join().unwrap();
        }
        Err(e) => {
            // No IPv6 loopback here: the URL is still accepted, and the client tries to reach
            // [::1] at that port (a connection error, not a URL error). The host and port it
            // parses to are checked by the unit test in src/http.rs.
            eprintln!("no IPv6 loopback ({e}); checking the URL without a server");
            let (listener, _) = listen();
            let port = listener.local_addr().unwrap().port();
            let url = format!("http://[::1]:{port}/score");
            let e = scorer(&url).score_texts(&[(0, "a")]).unwrap_err().to_string();
            assert!(e.contains(&url) && !e.contains("URL"), "{e}");
        }
    }
}

#[test]
fn bad_urls_are_refused_naming_them() {
    for url in [
        "https://example.com/score",
        "ftp://example.com/score",
        "http://",
        "http:///score",
        "http://:8080/score",
        "http://[]:8080/score",
        "http://host:port/score",
        "http://host:99999/score",
        "http://host:0/score",
        "http://host:/score",
        "http://[::1/score",
        "http://user@host:8080/score",
        "example.com:8080/score",
        "/score",
        "garbage",
        "",
        "http://exa mple.com/",
    ] {
        let e = match RemoteScorer::new(url, policy_tokenizer(), QUESTION) {
            Ok(s) => panic!("{url:?} accepted: {s:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&format!("{url:?}")), "{url:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    for url in [
        "http://127.0.0.1:8080/score",
        "http://localhost/score",
        "http://example.com",
        "http://[::1]:9/",
        "http://[fe80::1]/x?y=1",
        "http://reward-server.internal:65535/v1/score",
    ] {
        assert!(RemoteScorer::new(url, policy_tokenizer(), QUESTION).is_ok(), "{url:?} refused");
    }
}

#[test]
fn two_requests_reuse_one_connection() {
    let (listener, url) = listen();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (count, quit) = (Arc::clone(&accepted), Arc::clone(&stop));
    let server = std::thread::spawn(move || {
        let mut handlers = Vec::new();
        for stream in listener.incoming() {
            if quit.load(Ordering::SeqCst) {
                break;
            }
            let stream = stream.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            handlers.push(std::thread::spawn(move || {
                stream.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                // Keep-alive: answer requests on this connection until the client closes it.
                while let Some(request) = read_request(&mut reader) {
                    let body = answer_json(request.responses.len());
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
                    writer.write_all(head.as_bytes()).unwrap();
                    writer.write_all(body.as_bytes()).unwrap();
                }
            }));
        }
        for h in handlers {
            h.join().unwrap();
        }
    });
    let mut remote = scorer(&url);
    assert_eq!(remote.score_texts(&[(0, "a")]).unwrap().rewards, vec![0.5]);
    remote.release(&[0]);
    assert_eq!(remote.score_texts(&[(1, "b"), (2, "c")]).unwrap().rewards, vec![0.5, 1.5]);
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the second request opened a new connection");
    // Stop the server: drop the client (closing its connection), wake the accept loop.
    drop(remote);
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect(url.trim_start_matches("http://").trim_end_matches("/score"));
    server.join().unwrap();
}
