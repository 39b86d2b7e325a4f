#![no_std]
#![no_main]
// placeholder; the datapath is being written
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! { loop {} }
