#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    prealloc_fuzz::cookie(data);
});
