//! Static files: `GET`/`HEAD` of the files under a folder, with a `Content-Type` from the
//! extension and a `Content-Length` (download progress bars need it). Paths are
//! percent-decoded and must stay inside the folder: `..`, absolute paths, backslashes and
//! NUL are refused; `/` and folders serve their `index.html`.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::reason;

/// The `Content-Type` of a file, from its extension.
pub fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
        .unwrap_or("")
    {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "wasm" => "application/wasm",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Percent-decodes `s`; `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why a path maps to no file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It would leave the folder, or it is not a valid path (403).
    Forbidden,
    /// Nothing is there (404).
    NotFound,
}

/// The file under `root` that `path` (a request path, still percent-encoded, without its
/// query) names: `root/index.html` for `/`, `dir/index.html` for a folder.
pub fn resolve(root: &Path, path: &str) -> Result<PathBuf, Refused> {
    let decoded = percent_decode(path).ok_or(Refused::Forbidden)?;
    if !decoded.starts_with('/') || decoded.contains(['\\', '\0']) {
        return Err(Refused::Forbidden);
    }
    let relative = Path::new(decoded.trim_start_matches('/'));
    if relative.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Refused::Forbidden);
    }
    let mut file = root.join(relative);
    if file.is_dir() {
        file = file.join("index.html");
    }
    if file.is_file() { Ok(file) } else { Err(Refused::NotFound) }
}

/// What a static-file request gets: a file to send with 200, or a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send this file (it exists).
    File(PathBuf),
    /// A plain-text refusal: 403, 404 or 405, and its message.
    Refused(u16, String),
}

/// What `GET`/`HEAD` of `path` under `root` answers: the file, 403 for a path outside
/// `root`, 404 for no file, 405 for another method.
pub fn answer(root: &Path, method: &str, path: &str) -> Answer {
    if method != "GET" && method != "HEAD" {
        return Answer::Refused(405, "only GET and HEAD\n".into());
    }
    match resolve(root, path) {
        Ok(file) => Answer::File(file),
        Err(Refused::Forbidden) => Answer::Refused(403, format!("forbidden: {path}\n")),
        Err(Refused::NotFound) => Answer::Refused(404, format!("not found: {path}\n")),
    }
}

/// What the browser demo's site answers: `/models/<file>.gguf` from `models` (a single
/// `.gguf` file name, else 403), everything else from `root` as [`answer`] does. Without
/// `models`, `/models/…` is looked up under `root` like any path.
pub fn site_answer(root: &Path, models: Option<&Path>, method: &str, path: &str) -> Answer {
    let (Some(models), Some(name)) = (models, path.strip_prefix("/models/")) else {
        return answer(root, method, path);
    };
    if method != "GET" && method != "HEAD" {
        return answer(root, method, path);
    }
    let decoded = percent_decode(name).unwrap_or_default();
    if !decoded.ends_with(".gguf") || decoded.contains(['/', '\\']) {
        return Answer::Refused(403, "only /models/<file>.gguf\n".to_owned());
    }
    match resolve(models, &format!("/{name}")) {
        Ok(file) => Answer::File(file),
        Err(Refused::NotFound) => Answer::Refused(404, format!("not found: {path}\n")),
        Err(Refused::Forbidden) => Answer::Refused(403, format!("forbidden: {path}\n")),
    }
}

/// Writes `answer` on `stream`; only the head for `HEAD`. Returns the status sent.
fn send(stream: &mut impl Write, answer: Answer, method: &str) -> std::io::Result<u16> {
    let head = method == "HEAD";
    match answer {
        Answer::File(file) => serve_file(stream, &file, head),
        Answer::Refused(status, message) => {
            crate::write_response(
                stream,
                status,
                "text/plain; charset=utf-8",
                message.as_bytes(),
                !head,
            )?;
            Ok(status)
        }
    }
}

/// Answers `GET`/`HEAD` of `path` from `root` on `stream` ([`answer`]). Returns the status sent.
pub fn serve(
    stream: &mut impl Write,
    root: &Path,
    method: &str,
    path: &str,
) -> std::io::Result<u16> {
    send(stream, answer(root, method, path), method)
}

/// Answers `GET`/`HEAD` of the browser demo's site on `stream` ([`site_answer`]).
pub fn serve_site(
    stream: &mut impl Write,
    root: &Path,
    models: Option<&Path>,
    method: &str,
    path: &str,
) -> std::io::Result<u16> {
    send(stream, site_answer(root, models, method, path), method)
}

/// Sends `file` (a file known to exist) with status 200; only the head when `head_only`.
pub fn serve_file(stream: &mut impl Write, file: &Path, head_only: bool) -> std::io::Result<u16> {
    let mut body = match std::fs::File::open(file) {
        Ok(body) => body,
        Err(_) => {
            crate::write_response(
                stream,
                404,
                "text/plain; charset=utf-8",
                b"not found\n",
                !head_only,
            )?;
            return Ok(404);
        }
    };
    let len = body.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 {}\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        reason(200),
        content_type(file)
    )?;
    if !head_only {
        std::io::copy(&mut Read::by_ref(&mut body).take(len), stream)?;
    }
    stream.flush()?;
    Ok(200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inside_the_root_only() {
        let root = std::env::temp_dir().join(format!("specrej-http-files-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("index.html"), "<p>hi</p>").expect("write");
        std::fs::write(root.join("sub/a b.js"), "x").expect("write");
        assert_eq!(resolve(&root, "/"), Ok(root.join("index.html")));
        assert_eq!(resolve(&root, "/sub/a%20b.js"), Ok(root.join("sub/a b.js")));
        assert_eq!(resolve(&root, "/sub/"), Err(Refused::NotFound));
        assert_eq!(resolve(&root, "/missing.css"), Err(Refused::NotFound));
        for bad in [
            "/../etc/passwd",
            "/sub/../../x",
            "/%2e%2e/x",
            "/sub/%2e%2e/%2e%2e/x",
            "//etc/passwd",
            "/a\\b",
            "/%00",
            "/%zz",
            "x",
        ] {
            assert!(resolve(&root, bad).is_err(), "{bad}");
        }
        assert_eq!(resolve(&root, "/%2e%2e/x"), Err(Refused::Forbidden));
        let mut out = Vec::new();
        assert_eq!(serve(&mut out, &root, "HEAD", "/").expect("io"), 200);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("Content-Type: text/html")
                && text.contains("Content-Length: 9")
                && text.ends_with("\r\n\r\n"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn site_serves_models_from_their_own_folder() {
        let base = std::env::temp_dir().join(format!("specrej-http-site-{}", std::process::id()));
        let (root, models) = (base.join("dist"), base.join("models"));
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&models).expect("mkdir");
        std::fs::write(root.join("index.html"), "<p>hi</p>").expect("write");
        std::fs::write(models.join("m.gguf"), "GGUF1234").expect("write");
        std::fs::write(models.join("notes.txt"), "x").expect("write");
        let status = |models: Option<&Path>, method: &str, path: &str| {
            let mut out = Vec::new();
            let status = serve_site(&mut out, &root, models, method, path).expect("io");
            (status, String::from_utf8_lossy(&out).into_owned())
        };
        let (code, text) = status(Some(&models), "GET", "/models/m.gguf");
        assert_eq!(code, 200);
        assert!(text.contains("Content-Length: 8") && text.ends_with("GGUF1234"), "{text}");
        assert_eq!(status(Some(&models), "HEAD", "/models/m.gguf").0, 200);
        assert_eq!(status(Some(&models), "GET", "/models/missing.gguf").0, 404);
        for bad in [
            "/models/notes.txt",
            "/models/..%2fdist%2findex.html",
            "/models/%2e%2e/x.gguf",
            "/models/a%5cb.gguf",
        ] {
            assert_eq!(status(Some(&models), "GET", bad).0, 403, "{bad}");
        }
        assert_eq!(status(Some(&models), "POST", "/models/m.gguf").0, 405);
        assert_eq!(status(Some(&models), "GET", "/").0, 200);
        // Without a models folder, /models/ is just a path under the root.
        assert_eq!(status(None, "GET", "/models/m.gguf").0, 404);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn content_types() {
        for (name, kind) in [
            ("a.wasm", "application/wasm"),
            ("a.js", "text/javascript; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.css", "text/css; charset=utf-8"),
            ("a.svg", "image/svg+xml"),
            ("a.png", "image/png"),
            ("a.HTML", "text/html; charset=utf-8"),
            ("a.gguf", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(name)), kind, "{name}");
        }
    }
}
