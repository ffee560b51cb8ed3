//! The `prealloc-control-plane` binary (skeleton; see issue 3).
fn main() {
    eprintln!("prealloc-control-plane: not built yet");
    std::process::exit(2);
}
