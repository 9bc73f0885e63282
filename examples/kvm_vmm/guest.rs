//! The built-in guest: a 65-byte 32-bit program that keeps rewriting a region of RAM in
//! passes, checks an invariant that a lost page would break, and times its own accesses.
//!
//! Each page of the region holds, in its first dword, the number of the last pass that
//! wrote it. While pass `p` writes page `i`, page `i + 1` still holds `p - 1`: neighbours
//! differ by at most one. A migration that lost a write to a page (a missed dirty bit)
//! brings an older value to the destination, and the check after it fails there.
//!
//! Each page's step (write it, read the next) is timed with `rdtsc`; a step slower than a
//! threshold is reported with its cycle count. In postcopy that is how the guest sees a
//! fault on a page that has not arrived: its vCPU is blocked inside KVM on the VMM's
//! userfaultfd until the helper places the page. Every vCPU runs the same program on its
//! own slice of the region.

/// The guest reports each finished pass here (`eax` = the pass number).
pub(crate) const PROGRESS_PORT: u16 = 0x10;
/// The guest reports a broken invariant here (`eax` = the page index in its slice).
pub(crate) const VIOLATION_PORT: u16 = 0x11;
/// The guest reports a slow page step here (`eax` = TSC cycles it took).
pub(crate) const SLOW_PORT: u16 = 0x12;

/// Where the program is loaded, and where the vCPUs start.
pub(crate) const CODE_ADDR: u64 = 0x1000;
/// The first page of the region the guest rewrites; it runs to the end of RAM.
pub(crate) const REGION_ADDR: u64 = 0x10_0000;

/// Where [`PROGRAM`] holds the slow-step threshold (imm32 of `cmp eax, SLOW`).
const SLOW_IMM: usize = 0x27;

/// The program, assembled by hand (32-bit protected mode, flat segments, no stack: `esp`
/// is a scratch register). Inputs in registers, set by the VMM at start (and carried by
/// the migration with the rest of the vCPU state): `ebx` = slice base, `ebp` = slice
/// pages, `edi` = first pass number (1).
///
/// ```text
/// 00 pass:  89 DE              mov  esi, ebx          ; esi -> page 0
/// 02        31 C9              xor  ecx, ecx          ; ecx = page index
/// 04 page:  0F 31              rdtsc
/// 06        89 C4              mov  esp, eax          ; esp = start of this step
/// 08        89 3E              mov  [esi], edi        ; write this pass's number
/// 0A        8D 51 01           lea  edx, [ecx+1]
/// 0D        39 EA              cmp  edx, ebp
/// 0F        73 11              jae  next              ; the last page has no next neighbour
/// 11        89 F8              mov  eax, edi
/// 13        2B 86 00 10 00 00  sub  eax, [esi+0x1000] ; pass - next page's pass
/// 19        83 F8 01           cmp  eax, 1
/// 1C        76 04              jbe  next              ; 0 or 1 (unsigned: never negative)
/// 1E        89 C8              mov  eax, ecx
/// 20        E7 11              out  0x11, eax         ; violation at page ecx
/// 22 next:  0F 31              rdtsc
/// 24        29 E0              sub  eax, esp          ; cycles this step took
/// 26        3D xx xx xx xx     cmp  eax, SLOW         ; patched in by the VMM
/// 2B        72 02              jb   fast
/// 2D        E7 12              out  0x12, eax         ; a slow step: report its cycles
/// 2F fast:  81 C6 00 10 00 00  add  esi, 0x1000
/// 35        41                 inc  ecx
/// 36        39 E9              cmp  ecx, ebp
/// 38        72 CA              jb   page
/// 3A        89 F8              mov  eax, edi
/// 3C        E7 10              out  0x10, eax         ; pass done
/// 3E        47                 inc  edi
/// 3F        EB BF              jmp  pass
/// ```
const PROGRAM: [u8; 65] = [
    0x89, 0xDE, // mov esi, ebx
    0x31, 0xC9, // xor ecx, ecx
    0x0F, 0x31, // page: rdtsc
    0x89, 0xC4, // mov esp, eax
    0x89, 0x3E, // mov [esi], edi
    0x8D, 0x51, 0x01, // lea edx, [ecx+1]
    0x39, 0xEA, // cmp edx, ebp
    0x73, 0x11, // jae next
    0x89, 0xF8, // mov eax, edi
    0x2B, 0x86, 0x00, 0x10, 0x00, 0x00, // sub eax, [esi+0x1000]
    0x83, 0xF8, 0x01, // cmp eax, 1
    0x76, 0x04, // jbe next
    0x89, 0xC8, // mov eax, ecx
    0xE7, 0x11, // out 0x11, eax
    0x0F, 0x31, // next: rdtsc
    0x29, 0xE0, // sub eax, esp
    0x3D, 0x00, 0x00, 0x00, 0x00, // cmp eax, SLOW
    0x72, 0x02, // jb fast
    0xE7, 0x12, // out 0x12, eax
    0x81, 0xC6, 0x00, 0x10, 0x00, 0x00, // fast: add esi, 0x1000
    0x41, // inc ecx
    0x39, 0xE9, // cmp ecx, ebp
    0x72, 0xCA, // jb page
    0x89, 0xF8, // mov eax, edi
    0xE7, 0x10, // out 0x10, eax
    0x47, // inc edi
    0xEB, 0xBF, // jmp pass
];

/// The program with `slow_cycles` as the threshold above which a page step is reported.
pub(crate) fn program(slow_cycles: u32) -> [u8; 65] {
    let mut p = PROGRAM;
    p[SLOW_IMM..SLOW_IMM + 4].copy_from_slice(&slow_cycles.to_le_bytes());
    p
}

/// The page of its slice a vCPU stopped at with these registers: `ecx`, except before the
/// pass's `xor ecx, ecx`, where `ecx` still counts the last pass.
pub(crate) fn page_index(regs: &kvm_bindings::kvm_regs) -> u64 {
    if regs.rip < CODE_ADDR + 4 {
        0
    } else {
        regs.rcx & 0xffff_ffff
    }
}
