#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    prealloc_fuzz::control_plane_config(data);
});
