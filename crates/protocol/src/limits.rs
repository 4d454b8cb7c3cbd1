//! Named caps on everything a client or the host can make the agent allocate or loop over.

/// Most files one request may carry.
pub const MAX_FILES: usize = 256;
/// Longest file name, in bytes.
pub const MAX_FILE_NAME_BYTES: usize = 255;
/// Total bytes of file contents (as sent) in one request.
pub const MAX_FILES_BYTES: usize = 16 << 20;
/// Largest standard input.
pub const MAX_STDIN_BYTES: usize = 16 << 20;
/// Longest timeout of any stage.
pub const MAX_TIMEOUT_MS: u64 = 15 * 60 * 1000;
/// Largest output cap a request may ask for (per stage, stdout + stderr).
pub const MAX_OUTPUT_LIMIT_BYTES: u64 = 64 << 20;
/// Largest HTTP request body the agent accepts (base64 of files and stdin, plus framing).
pub const MAX_REQUEST_BODY_BYTES: usize = 48 << 20;
/// Most test cases one request may carry.
pub const MAX_TEST_CASES: usize = 64;
/// Output bytes kept across every test case of one request (each case gets its share).
pub const MAX_TESTS_OUTPUT_BYTES: u64 = 16 << 20;
/// Largest stack limit a request may set, KiB.
pub const MAX_STACK_LIMIT_KIB: u64 = 1 << 20;
/// Largest file-size limit a request may set, KiB.
pub const MAX_FILE_SIZE_LIMIT_KIB: u64 = 4 << 20;
