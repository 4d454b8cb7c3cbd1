//! Request and response bodies of the native API (`/v1`): defined once, in the `cloude-api`
//! crate (shared with the CLI, the tests and the bench).

pub use cloude_api::{
    signal_name, AppliedLimits, ExecutionRequest, ExecutionResponse, FileIn, LanguageInfo,
    StageOut, Status, StreamLine,
};
