//! Whether a GPU test may skip: the rule every backend's device tests share.

/// Whether `SPECREJ_REQUIRE_GPU` makes a missing `api` device ("wgpu" or "cuda") a failure
/// instead of a skip: `1` or `all` require every API, a comma list (`wgpu`, `wgpu,cuda`)
/// the ones it names. CI sets `wgpu`: it installs lavapipe, and has no CUDA device.
pub fn gpu_required(api: &str) -> bool {
    std::env::var("SPECREJ_REQUIRE_GPU").is_ok_and(|v| required(&v, api))
}

/// Records that the running test skipped, and why: printed, and appended as a line
/// `test<TAB>why` to the file `SPECREJ_SKIP_LOG` names (`cargo xtask test` counts them, since
/// cargo hides a passing test's output). The test is named by its thread (libtest names it).
pub fn skipped(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    eprintln!("{test}: skipped: {why}");
    if let Some(path) = std::env::var_os("SPECREJ_SKIP_LOG") {
        use std::io::Write;
        let line = format!("{test}\t{}\n", why.replace(['\t', '\n'], " "));
        // One write of one short line in append mode: lines from tests running at once stay whole.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "could not record the skip in {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
}

/// A test whose `api` device ("wgpu", "cuda") or device feature is missing: a failure when
/// `SPECREJ_REQUIRE_GPU` requires `api`, else a recorded [`skipped`].
pub fn gpu_missing(api: &str, why: &str) {
    assert!(!gpu_required(api), "SPECREJ_REQUIRE_GPU requires {api}, but: {why}");
    skipped(why);
}

fn required(value: &str, api: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|v| v == "1" || v.eq_ignore_ascii_case("all") || v.eq_ignore_ascii_case(api))
}

#[cfg(test)]
mod tests {
    use super::required;

    #[test]
    fn the_variable_names_apis() {
        assert!(required("1", "cuda") && required("all", "wgpu"));
        assert!(required("wgpu", "wgpu") && !required("wgpu", "cuda"));
        assert!(required("wgpu, cuda", "cuda"));
        assert!(!required("", "wgpu") && !required("0", "wgpu"));
    }
}
