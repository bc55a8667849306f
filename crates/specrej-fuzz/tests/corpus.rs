//! Every seed and every regression input (a crash the fuzzer once found) through its target:
//! the seeds load, and nothing panics.

use specrej_fuzz::targets::TARGETS;

#[test]
fn the_corpora_run_clean() {
    let work = std::env::temp_dir().join(format!("specrej-fuzz-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");
    for target in TARGETS {
        let files = specrej_fuzz::corpus_files(target.name).expect("corpus");
        let seeds = files.iter().filter(|f| f.to_string_lossy().contains("/corpus/")).count();
        assert!(seeds > 0, "{}: no seeds in fuzz/corpus/{}", target.name, target.name);
        for file in files {
            let bytes = std::fs::read(&file).expect("read");
            let outcome = (target.run)(&bytes, &work);
            // The seeds are valid inputs: every part of the target accepts them.
            if file.to_string_lossy().contains("/corpus/") {
                assert!(
                    outcome.split(" | ").all(|part| part == "ok"),
                    "{}: {} → {outcome}",
                    target.name,
                    file.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
