//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the checked
//! types of the handshake messages a peer sends, as `setup` parses and emits them.
//! Not a public API.

pub use crate::hello::{Ack, Hello, ACK_LEN, HELLO_LEN};
