//! The refusal rules, error shapes and ids, one case each (the golden files and property
//! tests are in `tests/it/translate.rs`).
