//! The LD_PRELOAD library (work in progress).
