//! The startup packet and the messages parsed from it or alongside it, on
//! arbitrary bytes: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgmux::protocol::frame::read_startup;
use pgmux::protocol::messages as msg;

/// One runtime for every input (making one per input would be most of
/// the time spent).
static RT: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some(rt) = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().ok()) else { return };
    let mut buf = bytes::BytesMut::new();
    let mut reader = data;
    let _ = rt.block_on(read_startup(&mut reader, &mut buf));
    let _ = msg::parse_startup_params(bytes::BytesMut::from(data));
    let _ = msg::parse_options(&String::from_utf8_lossy(data));
    let _ = msg::parse_bind(data);
    let _ = msg::parse_parameter_status(data);
});
