//! The `tokenwarden` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the proxy allocates a few dozen small blocks per call, and glibc's allocator was
/// a tenth of its time (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc as the `mimalloc` crate's `MiMalloc` uses it, except that blocks whose alignment
/// every mimalloc block has anyway (8 bytes: block sizes are multiples of the word, pages start
/// 16-aligned) take `mi_malloc`'s path: the crate asks for the aligned one every time, and its
/// slow path over-allocates (a measurable share of a proxied call; bench/RESULTS.md).
struct Allocator;

/// The alignment every mimalloc block has.
const WORD_ALIGNED: usize = std::mem::size_of::<usize>();

// SAFETY: each function forwards to mimalloc's matching allocation function, with the alignment
// asked for whenever it is more than every block has; `mi_free` frees blocks from all of them.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: as the trait requires, the caller gives a non-zero size.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as in `alloc`.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from this allocator with `layout`; the new block keeps its
        // alignment.
        unsafe {
            if layout.align() <= WORD_ALIGNED {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = tokenwarden::cli::Cli::parse();
    tokenwarden::cli::run(cli)
}
