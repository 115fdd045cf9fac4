//! `proxy_on_memory_allocate`: the host asks the guest for memory to copy results into.
//! The SDK takes such buffers back with `Vec::from_raw_parts(ptr, size, size)`, so the
//! allocation is a `Vec<u8>` with capacity exactly `size`. Out of memory answers 0 (the ABI's
//! "allocation failed") instead of trapping.

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let mut vec: Vec<u8> = Vec::new();
    if vec.try_reserve_exact(size).is_err() {
        return std::ptr::null_mut();
    }
    let ptr = vec.as_mut_ptr();
    std::mem::forget(vec);
    ptr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_exactly_and_fails_with_null() {
        let p = proxy_on_memory_allocate(100);
        assert!(!p.is_null());
        unsafe {
            std::ptr::write_bytes(p, 7, 100);
            let v = Vec::from_raw_parts(p, 100, 100);
            assert!(v.iter().all(|&b| b == 7));
        }
        assert!(proxy_on_memory_allocate(usize::MAX).is_null());
    }
}
