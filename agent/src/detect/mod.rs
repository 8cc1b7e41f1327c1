//! Detectors: pure code that turns windows of signals into [`crate::finding::Finding`]s.
//! (Being written.)
