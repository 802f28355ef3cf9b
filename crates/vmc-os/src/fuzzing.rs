//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the private
//! checks of what a peer sends. Not a public API: each one only forwards to the code
//! the segment layer itself runs.

/// Checks a directory segment name received from the peer, as
/// [`crate::Segment::open_in_dir`] does before it opens anything.
pub fn validate_chan_name(name: &str) -> Result<(), &'static str> {
    crate::segment::validate_chan_name(name)
}
