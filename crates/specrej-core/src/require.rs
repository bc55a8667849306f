//! Whether a GPU test may skip: the rule every backend's device tests share.

/// Whether `SPECREJ_REQUIRE_GPU` makes a missing `api` device ("wgpu" or "cuda") a failure
/// instead of a skip: `1` or `all` require every API, a comma list (`wgpu`, `wgpu,cuda`)
/// the ones it names. CI sets `wgpu`: it installs lavapipe, and has no CUDA device.
pub fn gpu_required(api: &str) -> bool {
    std::env::var("SPECREJ_REQUIRE_GPU").is_ok_and(|v| required(&v, api))
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
