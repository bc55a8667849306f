//! HTTP/1.1 on `std::net` for specrej's servers: one request per connection
//! (`Connection: close`), no TLS, no chunked bodies. No dependencies.
//!
//! - [`read_request`]: the request line, the headers and a `Content-Length` body, with the
//!   size checks every server here wants (431 headers too large, 413 body too large, 411 a
//!   chunked body or, where required, no `Content-Length`; 400 anything malformed), and
//!   `Expect: 100-continue`.
//! - [`write_response`] and [`reason`]: a whole response.
//! - [`files`]: static files under a folder (GET/HEAD, content types, no path traversal).
//! - [`serve`] (feature `server`): the tokio/hyper/axum serving loop and body rule of
//!   specrej-server and specrej-reward-server.

#![forbid(unsafe_code)]

pub mod files;
#[cfg(feature = "server")]
pub mod serve;

use std::io::{BufRead, BufReader, Read, Write};

/// What [`read_request`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The request line and headers together (more: 431).
    pub max_header_bytes: usize,
    /// The body (more: 413).
    pub max_body_bytes: usize,
    /// A body-carrying request without `Content-Length` is a 411 (else its body is empty).
    pub require_length: bool,
}

/// A request that could not be read, and the status to answer with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// 400, 411, 413 or 431.
    pub status: u16,
    /// What is wrong, for the client.
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, reason(self.status), self.message)
    }
}

impl std::error::Error for HttpError {}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The request target without its query string (`/v1/models`), still percent-encoded.
    pub path: String,
    /// Header (name, value) pairs in order, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (empty unless the method carries one).
    pub body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads one request from `stream`. The body is read only when `has_body(method)`; then
/// `Expect: 100-continue` is answered on `stream` before reading it. Never reads more than
/// `limits` allow.
pub fn read_request<S>(
    mut stream: S,
    limits: &Limits,
    has_body: impl Fn(&str) -> bool,
) -> Result<Request, HttpError>
where
    S: Read + Write,
{
    let budget = (limits.max_header_bytes + limits.max_body_bytes + 1) as u64;
    let mut reader = BufReader::new(Read::by_ref(&mut stream).take(budget));
    let bad = |m: String| HttpError::new(400, m);
    let mut header_bytes = 0usize;
    let mut line = String::new();
    let mut read_line = |reader: &mut dyn BufRead, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = reader.read_line(line).map_err(|e| bad(format!("cannot read the request: {e}")))?;
        header_bytes += n;
        if header_bytes > limits.max_header_bytes {
            return Err(HttpError::new(431, "request headers too large"));
        }
        if n == 0 {
            return Err(bad("connection closed before the end of the headers".into()));
        }
        Ok(())
    };
    read_line(&mut reader, &mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line".into()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("only HTTP/1.x is supported".into()));
    }
    let method = method.to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        read_line(&mut reader, &mut line)?;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(bad("malformed header line".into()));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = Request { method, path, headers, body: Vec::new() };
    if !has_body(&request.method) {
        return Ok(request);
    }
    if request
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return Err(HttpError::new(411, "chunked bodies are not supported: send a Content-Length"));
    }
    let length = match request.header("content-length") {
        Some(value) => value.parse::<usize>().map_err(|_| bad("invalid Content-Length".into()))?,
        None if limits.require_length => {
            return Err(HttpError::new(411, "a Content-Length is required"));
        }
        None => 0,
    };
    if length > limits.max_body_bytes {
        return Err(HttpError::new(
            413,
            format!("body of {length} bytes exceeds the limit of {}", limits.max_body_bytes),
        ));
    }
    if request.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = reader.get_mut().get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| bad(format!("body shorter than its Content-Length: {e}")))?;
    request.body = body;
    Ok(request)
}

/// The reason phrase of `status` (the ones these servers send).
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    }
}

/// Writes a whole response with `Content-Length` and `Connection: close`; the body only
/// when `with_body` (false answers a HEAD).
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}

/// [`write_response`] with a JSON body.
pub fn write_json(stream: &mut impl Write, status: u16, body: &str) -> std::io::Result<()> {
    write_response(stream, status, "application/json", body.as_bytes(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reads `input` and records what is written.
    struct Mock {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Mock {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Mock {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const LIMITS: Limits =
        Limits { max_header_bytes: 256, max_body_bytes: 16, require_length: false };

    fn read(input: &str, limits: &Limits) -> (Result<Request, HttpError>, String) {
        let mut mock =
            Mock { input: std::io::Cursor::new(input.as_bytes().to_vec()), output: Vec::new() };
        let result = read_request(&mut mock, limits, |m| m == "POST");
        (result, String::from_utf8_lossy(&mock.output).into_owned())
    }

    fn status(input: &str, limits: &Limits) -> u16 {
        read(input, limits).0.map_or_else(|e| e.status, |_| 200)
    }

    #[test]
    fn reads_requests_and_checks_limits() {
        let (request, written) = read(
            "POST /a/b?x=1 HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello+extra",
            &LIMITS,
        );
        let request = request.expect("a request");
        assert_eq!(
            (request.method.as_str(), request.path.as_str(), request.body.as_slice()),
            ("POST", "/a/b", &b"hello"[..])
        );
        assert_eq!(request.header("CONTENT-length"), Some("5"));
        assert!(written.starts_with("HTTP/1.1 100 Continue"), "{written}");
        let get = read("GET / HTTP/1.0\r\nHost: x\r\n\r\n", &LIMITS).0.expect("a GET");
        assert!(get.body.is_empty());
        assert_eq!(read("POST / HTTP/1.1\r\n\r\n", &LIMITS).0.expect("no length").body, b"");
        let strict = Limits { require_length: true, ..LIMITS };
        assert_eq!(status("POST / HTTP/1.1\r\n\r\n", &strict), 411);
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", &LIMITS), 411);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n", &LIMITS), 413);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", &LIMITS), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort", &LIMITS), 400);
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(300)), &LIMITS),
            431
        );
        assert_eq!(status("HELLO\r\n\r\n", &LIMITS), 400);
        assert_eq!(status("GET / SPDY/3\r\n\r\n", &LIMITS), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nno colon\r\n\r\n", &LIMITS), 400);
        assert_eq!(status("GET / HTTP/1.1\r\n", &LIMITS), 400);
    }
}
