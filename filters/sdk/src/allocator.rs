//! `proxy_on_memory_allocate`: the host asks the guest for memory to copy results into.
//! The SDK takes such buffers back with `Vec::from_raw_parts(ptr, size, size)`, so the
//! allocation is a `Vec<u8>` with capacity exactly `size`.

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut vec: Vec<u8> = Vec::with_capacity(size);
    let ptr = vec.as_mut_ptr();
    std::mem::forget(vec);
    ptr
}
