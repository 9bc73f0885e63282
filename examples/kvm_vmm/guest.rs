//! The built-in guest: a 48-byte 32-bit program that keeps rewriting a region of RAM in
//! passes and checks an invariant that a lost page would break.
//!
//! Each page of the region holds, in its first dword, the number of the last pass that
//! wrote it. While pass `p` writes page `i`, page `i + 1` still holds `p - 1`: neighbours
//! differ by at most one. A migration that lost a write to a page (a missed dirty bit)
//! brings an older value to the destination, and the check after it fails there.

/// The guest reports each finished pass here (`eax` = the pass number).
pub(crate) const PROGRESS_PORT: u16 = 0x10;
/// The guest reports a broken invariant here (`eax` = the page index).
pub(crate) const VIOLATION_PORT: u16 = 0x11;

/// Where the program is loaded, and where the vCPU starts.
pub(crate) const CODE_ADDR: u64 = 0x1000;
/// The first page of the region the guest rewrites; it runs to the end of RAM.
pub(crate) const REGION_ADDR: u64 = 0x10_0000;

/// The program, assembled by hand (32-bit protected mode, flat segments). Inputs in
/// registers, set by the VMM at start (and carried by the migration with the rest of the
/// vCPU state): `ebx` = region base, `ebp` = region pages, `edi` = first pass number (1).
///
/// ```text
/// 00 pass:  89 DE              mov  esi, ebx          ; esi -> page 0
/// 02        31 C9              xor  ecx, ecx          ; ecx = page index
/// 04 page:  89 3E              mov  [esi], edi        ; write this pass's number
/// 06        8D 51 01           lea  edx, [ecx+1]
/// 09        39 EA              cmp  edx, ebp
/// 0B        73 11              jae  next              ; the last page has no next neighbour
/// 0D        89 F8              mov  eax, edi
/// 0F        2B 86 00 10 00 00  sub  eax, [esi+0x1000] ; pass - next page's pass
/// 15        83 F8 01           cmp  eax, 1
/// 18        76 04              jbe  next              ; 0 or 1 (unsigned: never negative)
/// 1A        89 C8              mov  eax, ecx
/// 1C        E7 11              out  0x11, eax         ; violation at page ecx
/// 1E next:  81 C6 00 10 00 00  add  esi, 0x1000
/// 24        41                 inc  ecx
/// 25        39 E9              cmp  ecx, ebp
/// 27        72 DB              jb   page
/// 29        89 F8              mov  eax, edi
/// 2B        E7 10              out  0x10, eax         ; pass done
/// 2D        47                 inc  edi
/// 2E        EB D0              jmp  pass
/// ```
pub(crate) const PROGRAM: [u8; 48] = [
    0x89, 0xDE, // mov esi, ebx
    0x31, 0xC9, // xor ecx, ecx
    0x89, 0x3E, // page: mov [esi], edi
    0x8D, 0x51, 0x01, // lea edx, [ecx+1]
    0x39, 0xEA, // cmp edx, ebp
    0x73, 0x11, // jae next
    0x89, 0xF8, // mov eax, edi
    0x2B, 0x86, 0x00, 0x10, 0x00, 0x00, // sub eax, [esi+0x1000]
    0x83, 0xF8, 0x01, // cmp eax, 1
    0x76, 0x04, // jbe next
    0x89, 0xC8, // mov eax, ecx
    0xE7, 0x11, // out 0x11, eax
    0x81, 0xC6, 0x00, 0x10, 0x00, 0x00, // next: add esi, 0x1000
    0x41, // inc ecx
    0x39, 0xE9, // cmp ecx, ebp
    0x72, 0xDB, // jb page
    0x89, 0xF8, // mov eax, edi
    0xE7, 0x10, // out 0x10, eax
    0x47, // inc edi
    0xEB, 0xD0, // jmp pass
];
