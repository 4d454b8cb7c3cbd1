//! A root filesystem as an in-memory tree, and the application of tar layers to it.
//!
//! Pure (no I/O besides the `Read` it is given), so that it can be unit-tested with crafted layers
//! and fuzzed. Layer semantics follow the OCI image spec: whiteouts (`.wh.NAME`) and opaque
//! directories (`.wh..wh..opq`) hide entries of *lower* layers, so a layer's deletions are applied
//! before its additions. Every entry that would land outside the root — absolute paths, `..`,
//! writes through a symbolic link — is rejected with an error naming the entry.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Longest entry path accepted (the kernel's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Most bytes of file data an image may hold (all layers together, every version of a file
/// counted).
pub const MAX_TOTAL_BYTES: u64 = 8 << 30;
/// Most entries an image may hold (all layers together): every tar entry read counts, whiteouts,
/// opaque markers and ignored entries included, so a layer of millions of deletions is bounded
/// too.
pub const MAX_ENTRIES: u64 = 4_000_000;
/// Most bytes of entry paths and link targets an image's layers may carry together (each entry's
/// path is kept until its layer is applied, so this bounds that memory).
pub const MAX_PATH_BYTES: u64 = 256 << 20;
/// Most bytes of uncompressed tar stream (headers, data, padding) an image's layers may have
/// together. An initramfs is unpacked into guest RAM, so no bootable image comes near this; a
/// decompression bomb stops here, in bounded time.
pub const MAX_STREAM_BYTES: u64 = 8 << 30;

/// The caps a build enforces. [`Limits::default`] is the production set (the constants above);
/// [`Limits::lowered`] lets a caller (a test, a stricter deployment) only ever tighten them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// See [`MAX_ENTRIES`].
    pub max_entries: u64,
    /// See [`MAX_TOTAL_BYTES`].
    pub max_file_bytes: u64,
    /// See [`MAX_PATH_BYTES`].
    pub max_path_bytes: u64,
    /// See [`MAX_STREAM_BYTES`].
    pub max_stream_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: MAX_ENTRIES,
            max_file_bytes: MAX_TOTAL_BYTES,
            max_path_bytes: MAX_PATH_BYTES,
            max_stream_bytes: MAX_STREAM_BYTES,
        }
    }
}

impl Limits {
    /// The tighter of `self` and `other`, cap by cap (a cap can be lowered, never raised).
    pub fn lowered(self, other: Limits) -> Limits {
        Limits {
            max_entries: self.max_entries.min(other.max_entries),
            max_file_bytes: self.max_file_bytes.min(other.max_file_bytes),
            max_path_bytes: self.max_path_bytes.min(other.max_path_bytes),
            max_stream_bytes: self.max_stream_bytes.min(other.max_stream_bytes),
        }
    }
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Top-level directories that merged-`/usr` systems keep under `/usr`.
const MERGED_USR_DIRS: &[&[u8]] = &[b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32"];

/// Owner, permissions (including set-id and sticky bits) and modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
}

impl Meta {
    /// Root-owned with the given permissions.
    pub fn root(mode: u32) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }
}

/// A regular file's inode; hard links share one.
#[derive(Debug, PartialEq, Eq)]
pub struct Inode {
    pub id: u64,
    pub meta: Meta,
    pub data: Vec<u8>,
}

/// Character or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevKind {
    Char,
    Block,
}

/// One node of the tree.
#[derive(Debug, PartialEq, Eq)]
pub enum Node {
    Dir {
        meta: Meta,
        children: BTreeMap<Vec<u8>, Node>,
    },
    File(Arc<Inode>),
    Symlink {
        meta: Meta,
        target: Vec<u8>,
    },
    Device {
        meta: Meta,
        kind: DevKind,
        major: u32,
        minor: u32,
    },
    Fifo {
        meta: Meta,
    },
}

/// A callback of [`Tree::walk`]: the node's path and the node.
pub type Visitor<'a, E> = dyn FnMut(&[u8], &Node) -> Result<(), E> + 'a;

/// How to read a layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyOptions {
    /// Interpret OCI whiteouts (`.wh.*`); off for Debian packages.
    pub whiteouts: bool,
    /// Rewrite `bin/`, `lib/`, ... to `usr/bin/`, ... (Debian packages on a merged-`/usr` root).
    pub merged_usr: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("entry {entry:?} escapes the image root ({why})")]
    Escape { entry: String, why: &'static str },
    #[error("entry {entry:?} would be written through the symbolic link {link:?}")]
    ThroughSymlink { entry: String, link: String },
    #[error("entry {entry:?} needs {path:?} to be a directory, but it is not")]
    NotADirectory { entry: String, path: String },
    #[error("hard link {entry:?} points to {target:?}, which is not a file of the image")]
    BadHardLink { entry: String, target: String },
    #[error("entry {entry:?} has an unsupported tar type ({kind})")]
    Unsupported { entry: String, kind: String },
    #[error("the image exceeds {cap} ({limit} {unit}) at entry {entry:?}")]
    TooLarge {
        cap: &'static str,
        limit: u64,
        unit: &'static str,
        entry: String,
    },
    #[error("malformed tar archive: {0}")]
    Tar(#[source] std::io::Error),
}

/// The root filesystem under construction.
#[derive(Debug)]
pub struct Tree {
    pub root: Node,
    next_inode: u64,
    total_bytes: u64,
    total_entries: u64,
    path_bytes: u64,
    /// Uncompressed tar bytes read so far (shared with the reader of the layer being applied).
    stream_bytes: Arc<AtomicU64>,
    limits: Limits,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Splits an entry path into components, refusing anything that could leave the root.
pub fn components(path: &[u8]) -> Result<Vec<Vec<u8>>, TreeError> {
    let escape = |why| TreeError::Escape {
        entry: show(path),
        why,
    };
    if path.len() > MAX_PATH_LEN {
        return Err(escape("path too long"));
    }
    if path.first() == Some(&b'/') {
        return Err(escape("absolute path"));
    }
    if path.contains(&0) {
        return Err(escape("NUL byte in path"));
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(escape("`..` component")),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn join(comps: &[Vec<u8>]) -> String {
    show(&comps.join(&b'/'))
}

/// `bin/x` → `usr/bin/x` (and the other merged-`/usr` directories).
pub(crate) fn merge_usr(mut comps: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    if !comps.is_empty() && MERGED_USR_DIRS.contains(&comps[0].as_slice()) {
        comps.insert(0, b"usr".to_vec());
    }
    comps
}

/// Resolves a relative symlink `target` found at `dir` to an absolute path (lexically).
fn absolute_target(dir: &[Vec<u8>], target: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = dir.iter().map(Vec::as_slice).collect();
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = b"/".to_vec();
    out.extend(parts.join(&b'/'));
    out
}

/// One entry of a layer, read and validated, waiting to be applied.
struct Pending {
    comps: Vec<Vec<u8>>,
    entry: String,
    what: PendingKind,
}

enum PendingKind {
    Dir(Meta),
    File(Meta, Vec<u8>),
    Symlink(Meta, Vec<u8>),
    HardLink(Vec<Vec<u8>>, String),
    Device(Meta, DevKind, u32, u32),
    Fifo(Meta),
}

impl Tree {
    /// An empty root directory (mode 0755, owned by root) under the production [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty root directory under `limits` (never looser than the production ones).
    pub fn with_limits(limits: Limits) -> Self {
        Tree {
            root: Node::Dir {
                meta: Meta::root(0o755),
                children: BTreeMap::new(),
            },
            next_inode: 1,
            total_bytes: 0,
            total_entries: 0,
            path_bytes: 0,
            stream_bytes: Arc::new(AtomicU64::new(0)),
            limits: Limits::default().lowered(limits),
        }
    }

    /// The caps this tree enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn root_children(&mut self) -> &mut BTreeMap<Vec<u8>, Node> {
        match &mut self.root {
            Node::Dir { children, .. } => children,
            _ => unreachable!("the root is always a directory"),
        }
    }

    /// The children of directory `comps`. Missing directories are created (0755, root) when
    /// `create`, else `Ok(None)`. Symbolic links are never followed.
    fn dir_mut(
        &mut self,
        comps: &[Vec<u8>],
        entry: &str,
        create: bool,
    ) -> Result<Option<&mut BTreeMap<Vec<u8>, Node>>, TreeError> {
        let mut cur = self.root_children();
        for (i, c) in comps.iter().enumerate() {
            if !cur.contains_key(c) {
                if !create {
                    return Ok(None);
                }
                cur.insert(
                    c.clone(),
                    Node::Dir {
                        meta: Meta::root(0o755),
                        children: BTreeMap::new(),
                    },
                );
            }
            cur = match cur.get_mut(c) {
                Some(Node::Dir { children, .. }) => children,
                Some(Node::Symlink { .. }) => {
                    return Err(TreeError::ThroughSymlink {
                        entry: entry.to_string(),
                        link: join(&comps[..=i]),
                    })
                }
                _ => {
                    return Err(TreeError::NotADirectory {
                        entry: entry.to_string(),
                        path: join(&comps[..=i]),
                    })
                }
            };
        }
        Ok(Some(cur))
    }

    /// The node at `comps` without following symbolic links (`None` if missing).
    pub fn get(&self, comps: &[Vec<u8>]) -> Option<&Node> {
        let mut cur = &self.root;
        for c in comps {
            match cur {
                Node::Dir { children, .. } => cur = children.get(c)?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// Whether `comps` names something, following symbolic links (absolute targets from the
    /// tree's root, relative ones from the link's directory; at most 40 links, as Linux).
    pub fn resolves(&self, comps: &[Vec<u8>]) -> bool {
        let mut todo: Vec<Vec<u8>> = comps.iter().rev().cloned().collect();
        let mut at: Vec<Vec<u8>> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    at.pop();
                    continue;
                }
                _ => {}
            }
            at.push(c);
            match self.get(&at) {
                None => return false,
                Some(Node::Symlink { target, .. }) => {
                    links += 1;
                    if links > 40 {
                        return false;
                    }
                    at.pop();
                    if target.first() == Some(&b'/') {
                        at.clear();
                    }
                    todo.extend(target.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
                }
                Some(_) => {}
            }
        }
        true
    }

    /// The node at a slash-separated path (`"usr/bin/env"`).
    pub fn lookup(&self, path: &str) -> Option<&Node> {
        self.get(&components(path.as_bytes()).ok()?)
    }

    /// Counts one entry of `bytes` bytes of file data against [`MAX_ENTRIES`] and
    /// [`MAX_TOTAL_BYTES`] (or the tree's lower [`Limits`]).
    pub fn count(&mut self, bytes: u64, entry: &str) -> Result<(), TreeError> {
        self.count_entry(0, entry)?;
        self.count_data(bytes, entry)
    }

    /// Counts one entry with `path_len` bytes of path and link target.
    fn count_entry(&mut self, path_len: u64, entry: &str) -> Result<(), TreeError> {
        self.total_entries += 1;
        self.path_bytes = self.path_bytes.saturating_add(path_len);
        if self.total_entries > self.limits.max_entries {
            return Err(self.too_large("MAX_ENTRIES", self.limits.max_entries, "entries", entry));
        }
        if self.path_bytes > self.limits.max_path_bytes {
            let limit = self.limits.max_path_bytes;
            return Err(self.too_large("MAX_PATH_BYTES", limit, "bytes of paths", entry));
        }
        Ok(())
    }

    /// Counts `bytes` of file data; also refuses at once a file that could not fit in what is
    /// left of the stream budget (its data would have to be decompressed first).
    fn count_data(&mut self, bytes: u64, entry: &str) -> Result<(), TreeError> {
        self.total_bytes = self.total_bytes.saturating_add(bytes);
        if self.total_bytes > self.limits.max_file_bytes {
            let limit = self.limits.max_file_bytes;
            return Err(self.too_large("MAX_TOTAL_BYTES", limit, "bytes of file data", entry));
        }
        if self
            .stream_bytes
            .load(Ordering::Relaxed)
            .saturating_add(bytes)
            > self.limits.max_stream_bytes
        {
            return Err(self.stream_too_large(entry));
        }
        Ok(())
    }

    fn too_large(
        &self,
        cap: &'static str,
        limit: u64,
        unit: &'static str,
        entry: &str,
    ) -> TreeError {
        TreeError::TooLarge {
            cap,
            limit,
            unit,
            entry: entry.to_string(),
        }
    }

    fn stream_too_large(&self, entry: &str) -> TreeError {
        let limit = self.limits.max_stream_bytes;
        self.too_large(
            "MAX_STREAM_BYTES",
            limit,
            "bytes of uncompressed layers",
            entry,
        )
    }

    /// Puts `node` at `comps` (creating parents, replacing what was there; a directory placed
    /// over a directory only updates its metadata).
    pub fn insert(&mut self, comps: &[Vec<u8>], node: Node, entry: &str) -> Result<(), TreeError> {
        let Some((name, parent)) = comps.split_last() else {
            if let (Node::Dir { meta: new, .. }, Node::Dir { meta, .. }) = (&node, &mut self.root) {
                *meta = *new;
            }
            return Ok(());
        };
        let dir = self
            .dir_mut(parent, entry, true)?
            .expect("dir_mut creates missing directories");
        match (dir.get_mut(name), node) {
            (Some(Node::Dir { meta, .. }), Node::Dir { meta: new, .. }) => *meta = new,
            (_, node) => {
                dir.insert(name.clone(), node);
            }
        }
        Ok(())
    }

    /// Adds a regular file with a fresh inode.
    pub fn insert_file(&mut self, path: &str, meta: Meta, data: Vec<u8>) -> Result<(), TreeError> {
        let comps = components(path.as_bytes())?;
        self.count(data.len() as u64, path)?;
        let node = self.new_file(meta, data);
        self.insert(&comps, node, path)
    }

    /// A regular file node with a fresh inode, counted against the limits (not yet inserted;
    /// hard links share it through [`Arc::clone`] of the inode).
    pub fn file_node(&mut self, meta: Meta, data: Vec<u8>, entry: &str) -> Result<Node, TreeError> {
        self.count(data.len() as u64, entry)?;
        Ok(self.new_file(meta, data))
    }

    fn new_file(&mut self, meta: Meta, data: Vec<u8>) -> Node {
        let id = self.next_inode;
        self.next_inode += 1;
        Node::File(Arc::new(Inode { id, meta, data }))
    }

    /// Removes the node at `comps` if it exists (never through a symbolic link).
    pub fn remove(&mut self, comps: &[Vec<u8>], entry: &str) -> Result<Option<Node>, TreeError> {
        let Some((name, parent)) = comps.split_last() else {
            return Ok(None);
        };
        Ok(self
            .dir_mut(parent, entry, false)?
            .and_then(|d| d.remove(name)))
    }

    /// Removes every node for which `pred(path)` holds (`path` is slash-separated, relative).
    pub fn prune(&mut self, pred: &dyn Fn(&str) -> bool) -> u64 {
        fn walk(node: &mut Node, prefix: &mut String, pred: &dyn Fn(&str) -> bool) -> u64 {
            let Node::Dir { children, .. } = node else {
                return 0;
            };
            let mut removed = 0;
            children.retain(|name, _| {
                let len = prefix.len();
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(&String::from_utf8_lossy(name));
                let keep = !pred(prefix);
                prefix.truncate(len);
                removed += u64::from(!keep);
                keep
            });
            for (name, child) in children.iter_mut() {
                let len = prefix.len();
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(&String::from_utf8_lossy(name));
                removed += walk(child, prefix, pred);
                prefix.truncate(len);
            }
            removed
        }
        walk(&mut self.root, &mut String::new(), pred)
    }

    /// Visits every node but the root in pre-order (parents before children, names sorted).
    pub fn walk<E>(&self, f: &mut Visitor<'_, E>) -> Result<(), E> {
        fn go<E>(node: &Node, path: &mut Vec<u8>, f: &mut Visitor<'_, E>) -> Result<(), E> {
            if let Node::Dir { children, .. } = node {
                for (name, child) in children {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push(b'/');
                    }
                    path.extend_from_slice(name);
                    f(path, child)?;
                    go(child, path, f)?;
                    path.truncate(len);
                }
            }
            Ok(())
        }
        go(&self.root, &mut Vec::new(), f)
    }

    /// Applies one tar layer, reading it only up to its end-of-archive marker. Every byte read
    /// counts against [`MAX_STREAM_BYTES`], every entry against [`MAX_ENTRIES`] and
    /// [`MAX_PATH_BYTES`] (or the tree's lower [`Limits`]).
    pub fn apply_tar<R: Read>(&mut self, reader: R, opts: ApplyOptions) -> Result<(), TreeError> {
        let counted = CountingReader {
            inner: reader,
            count: Arc::clone(&self.stream_bytes),
            limit: self.limits.max_stream_bytes,
        };
        let mut last = String::new();
        let result = self.apply_counted(counted, opts, &mut last);
        if self.stream_bytes.load(Ordering::Relaxed) > self.limits.max_stream_bytes {
            // Whatever error the tar reader made of the refused read, the cause is the cap.
            return Err(self.stream_too_large(&last));
        }
        result
    }

    fn apply_counted<R: Read>(
        &mut self,
        reader: R,
        opts: ApplyOptions,
        last: &mut String,
    ) -> Result<(), TreeError> {
        let mut archive = tar::Archive::new(reader);
        let mut opaque = Vec::new();
        let mut whiteouts = Vec::new();
        let mut pending = Vec::new();
        for entry in archive.entries().map_err(TreeError::Tar)? {
            let mut e = entry.map_err(TreeError::Tar)?;
            let raw = e.path_bytes().into_owned();
            let entry_name = show(&raw);
            last.clone_from(&entry_name);
            let link_len = e.link_name_bytes().map_or(0, |l| l.len());
            self.count_entry((raw.len() + link_len) as u64, &entry_name)?;
            let mut comps = components(&raw)?;
            if opts.whiteouts {
                if let Some(name) = comps.last() {
                    if name.as_slice() == OPAQUE_MARKER {
                        comps.pop();
                        opaque.push((comps, entry_name));
                        continue;
                    }
                    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                        if !hidden.starts_with(WHITEOUT_PREFIX) && !hidden.is_empty() {
                            let hidden = hidden.to_vec();
                            comps.pop();
                            comps.push(hidden);
                            whiteouts.push((comps, entry_name));
                        }
                        // Other `.wh..wh.*` names are AUFS metadata: ignored.
                        continue;
                    }
                }
            }
            if opts.merged_usr {
                comps = merge_usr(comps);
            }
            let h = e.header();
            let meta = Meta {
                mode: h.mode().map_err(TreeError::Tar)? & 0o7777,
                uid: u32::try_from(h.uid().map_err(TreeError::Tar)?).unwrap_or(u32::MAX),
                gid: u32::try_from(h.gid().map_err(TreeError::Tar)?).unwrap_or(u32::MAX),
                mtime: h.mtime().unwrap_or(0),
            };
            let kind = h.entry_type();
            let dev = |h: &tar::Header| -> Result<(u32, u32), TreeError> {
                Ok((
                    h.device_major().map_err(TreeError::Tar)?.unwrap_or(0),
                    h.device_minor().map_err(TreeError::Tar)?.unwrap_or(0),
                ))
            };
            use tar::EntryType as T;
            let what = match kind {
                T::Directory => PendingKind::Dir(meta),
                T::Regular | T::Continuous => {
                    let size = e.size();
                    self.count_data(size, &entry_name)?;
                    let mut data = Vec::with_capacity(size.min(64 << 20) as usize);
                    e.read_to_end(&mut data).map_err(TreeError::Tar)?;
                    PendingKind::File(meta, data)
                }
                T::Symlink => {
                    let mut target = e
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    if opts.merged_usr && raw_moved(&raw, &comps) && target.first() != Some(&b'/') {
                        let orig = components(&raw)?;
                        target = absolute_target(&orig[..orig.len().saturating_sub(1)], &target);
                    }
                    PendingKind::Symlink(meta, target)
                }
                T::Link => {
                    let target = e
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let mut tc = components(&target).map_err(|_| TreeError::Escape {
                        entry: entry_name.clone(),
                        why: "hard link target outside the root",
                    })?;
                    if opts.merged_usr {
                        tc = merge_usr(tc);
                    }
                    PendingKind::HardLink(tc, show(&target))
                }
                T::Char | T::Block => {
                    let (ma, mi) = dev(h)?;
                    let k = if kind == T::Char {
                        DevKind::Char
                    } else {
                        DevKind::Block
                    };
                    PendingKind::Device(meta, k, ma, mi)
                }
                T::Fifo => PendingKind::Fifo(meta),
                T::XGlobalHeader => continue,
                other => {
                    return Err(TreeError::Unsupported {
                        entry: entry_name,
                        kind: format!("{other:?}"),
                    })
                }
            };
            pending.push(Pending {
                comps,
                entry: entry_name,
                what,
            });
        }
        // Deletions hide lower layers only: apply them before this layer's additions.
        for (dir, entry) in opaque {
            if let Some(children) = self.dir_mut(&dir, &entry, false)? {
                children.clear();
            }
        }
        for (comps, entry) in whiteouts {
            self.remove(&comps, &entry)?;
        }
        for p in pending {
            let node = match p.what {
                PendingKind::Dir(meta) => Node::Dir {
                    meta,
                    children: BTreeMap::new(),
                },
                PendingKind::File(meta, data) => self.new_file(meta, data),
                PendingKind::Symlink(meta, target) => Node::Symlink { meta, target },
                PendingKind::Device(meta, kind, major, minor) => Node::Device {
                    meta,
                    kind,
                    major,
                    minor,
                },
                PendingKind::Fifo(meta) => Node::Fifo { meta },
                PendingKind::HardLink(target, shown) => {
                    if target == p.comps {
                        continue;
                    }
                    if let Some((_, parent)) = target.split_last() {
                        // Errors if the target's directory is reached through a symlink.
                        self.dir_mut(parent, &p.entry, false)?;
                    }
                    match self.get(&target) {
                        Some(Node::File(inode)) => Node::File(Arc::clone(inode)),
                        Some(Node::Symlink { meta, target }) => Node::Symlink {
                            meta: *meta,
                            target: target.clone(),
                        },
                        _ => {
                            return Err(TreeError::BadHardLink {
                                entry: p.entry,
                                target: shown,
                            })
                        }
                    }
                }
            };
            self.insert(&p.comps, node, &p.entry)?;
        }
        Ok(())
    }

    /// Makes the tree safe to boot as user code's root: removes every character and block device
    /// node and clears the setuid and setgid bits of every non-directory. User code must never
    /// gain privileges or reach hardware through an image file: a set-id binary would run with
    /// its owner's (often root's) rights, a device node would open a disk or memory of the guest
    /// to whoever may open the node. (Set-gid on a directory only picks the group of new files,
    /// and is kept.) FIFOs are kept: a named pipe carries data between processes that could pipe
    /// to each other anyway, and grants nothing. Run before the builder adds its own
    /// `/dev/console` and `/dev/null`.
    pub fn sanitize(&mut self) -> Sanitized {
        fn go(
            node: &mut Node,
            path: &mut Vec<u8>,
            out: &mut Sanitized,
            done: &mut HashMap<u64, Arc<Inode>>,
        ) {
            let Node::Dir { children, .. } = node else {
                return;
            };
            children.retain(|name, child| {
                if !matches!(child, Node::Device { .. }) {
                    return true;
                }
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                out.devices += 1;
                if out.device_examples.len() < Sanitized::EXAMPLES {
                    out.device_examples.push(show(&p));
                }
                false
            });
            for (name, child) in children.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                match child {
                    Node::File(inode) if inode.meta.mode & SET_ID_BITS != 0 => {
                        let fresh = done.entry(inode.id).or_insert_with(|| {
                            out.setid += 1;
                            if out.setid_examples.len() < Sanitized::EXAMPLES {
                                out.setid_examples.push(show(path));
                            }
                            let mut meta = inode.meta;
                            meta.mode &= !SET_ID_BITS;
                            Arc::new(Inode {
                                id: inode.id,
                                meta,
                                data: inode.data.clone(),
                            })
                        });
                        *child = Node::File(Arc::clone(fresh));
                    }
                    Node::Symlink { meta, .. } | Node::Fifo { meta } => meta.mode &= !SET_ID_BITS,
                    Node::Dir { .. } => go(child, path, out, done),
                    _ => {}
                }
                path.truncate(len);
            }
        }
        let mut out = Sanitized::default();
        go(
            &mut self.root,
            &mut Vec::new(),
            &mut out,
            &mut HashMap::new(),
        );
        out
    }

    /// Per-inode link counts of regular files (for the cpio writer).
    pub fn link_counts(&self) -> HashMap<u64, u32> {
        let mut counts = HashMap::new();
        let _ = self.walk::<()>(&mut |_, n| {
            if let Node::File(i) = n {
                *counts.entry(i.id).or_insert(0) += 1;
            }
            Ok(())
        });
        counts
    }
}

/// The setuid and setgid permission bits.
const SET_ID_BITS: u32 = 0o6000;

/// What [`Tree::sanitize`] removed or changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sanitized {
    /// Device nodes removed.
    pub devices: u64,
    /// The first few of them.
    pub device_examples: Vec<String>,
    /// Files (inodes) whose setuid/setgid bits were cleared.
    pub setid: u64,
    /// The first few of them.
    pub setid_examples: Vec<String>,
}

impl Sanitized {
    /// How many paths of each kind a warning quotes.
    pub const EXAMPLES: usize = 5;
}

/// Counts the bytes read through it into a shared counter and refuses to read past `limit` (the
/// caller turns the refusal into an error naming the cap).
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
    limit: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let used = self.count.load(Ordering::Relaxed);
        if used > self.limit {
            return Err(io::Error::other("MAX_STREAM_BYTES exceeded"));
        }
        // One byte past the limit is allowed through, so that reaching it exactly is no error.
        let room = usize::try_from(self.limit - used + 1).unwrap_or(usize::MAX);
        let n = buf.len().min(room);
        let got = self.inner.read(&mut buf[..n])?;
        self.count.store(used + got as u64, Ordering::Relaxed);
        if used + got as u64 > self.limit {
            return Err(io::Error::other("MAX_STREAM_BYTES exceeded"));
        }
        Ok(got)
    }
}

/// Whether the merged-`/usr` rewrite moved this entry.
fn raw_moved(raw: &[u8], comps: &[Vec<u8>]) -> bool {
    components(raw)
        .map(|c| c.len() != comps.len())
        .unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tar layer from (path, kind, data-or-link-target).
    pub(crate) fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(if *kind == 'd' { 0o755 } else { 0o644 });
            h.set_uid(1);
            h.set_gid(2);
            h.set_mtime(7);
            let ty = match kind {
                'd' => tar::EntryType::Directory,
                'f' => tar::EntryType::Regular,
                'l' => tar::EntryType::Symlink,
                'h' => tar::EntryType::Link,
                _ => unreachable!(),
            };
            h.set_entry_type(ty);
            // set_path refuses `..`; write the raw name to craft hostile entries.
            let name = h.as_old_mut().name.as_mut();
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
            if matches!(kind, 'l' | 'h') {
                h.set_link_name(data).expect("short link");
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).expect("append");
            } else {
                let body = if *kind == 'f' { data.as_bytes() } else { b"" };
                h.set_size(body.len() as u64);
                h.set_cksum();
                b.append(&h, body).expect("append");
            }
        }
        b.into_inner().expect("finish")
    }

    fn paths(t: &Tree) -> Vec<String> {
        let mut v = Vec::new();
        t.walk::<()>(&mut |p, _| {
            v.push(show(p));
            Ok(())
        })
        .expect("walk");
        v
    }

    fn content(t: &Tree, p: &str) -> Option<String> {
        match t.lookup(p)? {
            Node::File(i) => Some(show(&i.data)),
            _ => None,
        }
    }

    const OCI: ApplyOptions = ApplyOptions {
        whiteouts: true,
        merged_usr: false,
    };

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let mut t = Tree::new();
        let l1 = layer(&[
            ("etc/", 'd', ""),
            ("etc/keep", 'f', "k"),
            ("etc/gone", 'f', "g"),
            ("opt/", 'd', ""),
            ("opt/old/", 'd', ""),
            ("opt/old/a", 'f', "a"),
            ("opt/b", 'f', "b"),
        ]);
        let l2 = layer(&[
            ("etc/.wh.gone", 'f', ""),
            ("opt/new", 'f', "n"),
            ("opt/.wh..wh..opq", 'f', ""),
            ("etc/added", 'f', "x"),
        ]);
        t.apply_tar(&l1[..], OCI).expect("l1");
        t.apply_tar(&l2[..], OCI).expect("l2");
        assert_eq!(
            paths(&t),
            ["etc", "etc/added", "etc/keep", "opt", "opt/new"],
            "same-layer entries survive the opaque marker, lower ones do not"
        );
        assert_eq!(content(&t, "opt/new").as_deref(), Some("n"));
        match t.lookup("etc/keep") {
            Some(Node::File(i)) => assert_eq!((i.meta.uid, i.meta.gid, i.meta.mode), (1, 2, 0o644)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_entries_are_rejected_by_name() {
        for (entries, needle) in [
            (vec![("../evil", 'f', "x")], "../evil"),
            (vec![("a/../../evil", 'f', "x")], "a/../../evil"),
            (vec![("/etc/passwd", 'f', "x")], "/etc/passwd"),
            (
                vec![("link", 'l', "/etc"), ("link/passwd", 'f', "x")],
                "link/passwd",
            ),
            (
                vec![("link", 'l', "../.."), ("link/x/y", 'f', "x")],
                "link/x/y",
            ),
            (vec![("h", 'h', "../../etc/shadow")], "h"),
            (vec![("h", 'h', "missing")], "h"),
        ] {
            let mut t = Tree::new();
            let err = t.apply_tar(&layer(&entries)[..], OCI).expect_err(needle);
            assert!(err.to_string().contains(needle), "{err}");
        }
        // A whiteout may not delete through a symlink either.
        let mut t = Tree::new();
        t.apply_tar(&layer(&[("l", 'l', "/")])[..], OCI).expect("l");
        let err = t
            .apply_tar(&layer(&[("l/.wh.etc", 'f', "")])[..], OCI)
            .expect_err("through link");
        assert!(matches!(err, TreeError::ThroughSymlink { .. }), "{err}");
    }

    #[test]
    fn hard_links_share_an_inode_and_files_replace_dirs() {
        let mut t = Tree::new();
        let l = layer(&[
            ("a", 'f', "data"),
            ("b", 'h', "a"),
            ("d/", 'd', ""),
            ("d/x", 'f', "x"),
            ("s", 'l', "a"),
        ]);
        t.apply_tar(&l[..], OCI).expect("apply");
        t.apply_tar(&layer(&[("d", 'f', "now a file")])[..], OCI)
            .expect("replace");
        let counts = t.link_counts();
        let id = match t.lookup("b") {
            Some(Node::File(i)) => i.id,
            other => panic!("{other:?}"),
        };
        assert_eq!(counts[&id], 2);
        assert_eq!(content(&t, "d").as_deref(), Some("now a file"));
        assert_eq!(paths(&t), ["a", "b", "d", "s"]);
    }

    #[test]
    fn merged_usr_rewrites_paths_and_relative_links() {
        let mut t = Tree::new();
        let opts = ApplyOptions {
            whiteouts: false,
            merged_usr: true,
        };
        let l = layer(&[
            ("./bin/", 'd', ""),
            ("./bin/bash", 'f', "b"),
            ("./bin/rbash", 'l', "bash"),
            ("./bin/up", 'l', "../usr/bin/x"),
            ("./bin/.wh.x", 'f', "not a whiteout"),
        ]);
        t.apply_tar(&l[..], opts).expect("apply");
        assert_eq!(content(&t, "usr/bin/bash").as_deref(), Some("b"));
        assert_eq!(
            content(&t, "usr/bin/.wh.x").as_deref(),
            Some("not a whiteout")
        );
        match t.lookup("usr/bin/up") {
            Some(Node::Symlink { target, .. }) => assert_eq!(target, b"/usr/bin/x"),
            other => panic!("{other:?}"),
        }
        match t.lookup("usr/bin/rbash") {
            Some(Node::Symlink { target, .. }) => assert_eq!(target, b"/bin/bash"),
            other => panic!("{other:?}"),
        }
        assert!(t.lookup("bin").is_none());
    }

    #[test]
    fn prune_removes_subtrees() {
        let mut t = Tree::new();
        let l = layer(&[
            ("usr/share/doc/x/README", 'f', "r"),
            ("usr/bin/x", 'f', "x"),
        ]);
        t.apply_tar(&l[..], OCI).expect("apply");
        assert_eq!(t.prune(&|p| p == "usr/share/doc"), 1);
        assert_eq!(paths(&t), ["usr", "usr/bin", "usr/bin/x", "usr/share"]);
    }

    #[test]
    fn whiteouts_and_markers_count_against_the_entry_cap() {
        let limits = Limits {
            max_entries: 10,
            ..Limits::default()
        };
        let names: Vec<String> = (0..11).map(|i| format!(".wh.gone{i}")).collect();
        let entries: Vec<(&str, char, &str)> =
            names.iter().map(|n| (n.as_str(), 'f', "")).collect();
        let mut t = Tree::with_limits(limits);
        let err = t
            .apply_tar(&layer(&entries)[..], OCI)
            .expect_err("over the cap");
        assert!(
            err.to_string().contains("MAX_ENTRIES (10 entries)"),
            "{err}"
        );
        assert!(err.to_string().contains(".wh.gone10"), "{err}");
        let markers = vec![("a/.wh..wh..opq", 'f', ""); 11];
        let mut t = Tree::with_limits(limits);
        let err = t.apply_tar(&layer(&markers)[..], OCI).expect_err("markers");
        assert!(err.to_string().contains("MAX_ENTRIES"), "{err}");
    }

    #[test]
    fn path_bytes_and_stream_bytes_are_capped() {
        let mut t = Tree::with_limits(Limits {
            max_path_bytes: 20,
            ..Limits::default()
        });
        let l = layer(&[("aaaaaaaaaa", 'f', ""), ("bbbbbbbbbb", 'l', "c")]);
        let err = t.apply_tar(&l[..], OCI).expect_err("paths");
        assert!(
            err.to_string()
                .contains("MAX_PATH_BYTES (20 bytes of paths)"),
            "{err}"
        );

        // A file bigger than the stream budget is refused from its header, unread.
        let big = "x".repeat(5000);
        let mut t = Tree::with_limits(Limits {
            max_stream_bytes: 4096,
            ..Limits::default()
        });
        let err = t
            .apply_tar(&layer(&[("big", 'f', &big)])[..], OCI)
            .expect_err("big");
        assert!(err.to_string().contains("MAX_STREAM_BYTES (4096"), "{err}");
        assert!(err.to_string().contains("\"big\""), "{err}");
        // Many small entries reach it through the stream count, across layers.
        let mut t = Tree::with_limits(Limits {
            max_stream_bytes: 8192,
            ..Limits::default()
        });
        t.apply_tar(&layer(&[("a", 'f', "1")])[..], OCI)
            .expect("first");
        let err = t
            .apply_tar(&layer(&[("b", 'f', "2"); 20])[..], OCI)
            .expect_err("many");
        assert!(err.to_string().contains("MAX_STREAM_BYTES"), "{err}");
        // Limits can only be lowered.
        let t = Tree::with_limits(Limits {
            max_entries: u64::MAX,
            ..Limits::default()
        });
        assert_eq!(t.limits(), Limits::default());
    }

    #[test]
    fn sanitize_drops_devices_and_set_id_bits() {
        let mut t = Tree::new();
        let l = layer(&[
            ("bin/su", 'f', "su"),
            ("bin/su2", 'h', "bin/su"),
            ("d/", 'd', ""),
        ]);
        t.apply_tar(&l[..], OCI).expect("layer");
        let set_mode = |t: &mut Tree, path: &str, mode: u32| {
            let comps = components(path.as_bytes()).expect("path");
            let node = match t.get(&comps) {
                Some(Node::File(i)) => Node::File(Arc::new(Inode {
                    id: i.id,
                    meta: Meta { mode, ..i.meta },
                    data: i.data.clone(),
                })),
                Some(Node::Dir { .. }) => Node::Dir {
                    meta: Meta::root(mode),
                    children: BTreeMap::new(),
                },
                other => panic!("{other:?}"),
            };
            t.insert(&comps, node, path).expect("insert");
        };
        set_mode(&mut t, "bin/su", 0o4755);
        set_mode(&mut t, "d", 0o2775);
        let hl = match t.lookup("bin/su") {
            Some(Node::File(i)) => Arc::clone(i),
            _ => unreachable!(),
        };
        t.insert(
            &components(b"bin/su2").expect("p"),
            Node::File(hl),
            "bin/su2",
        )
        .expect("link");
        for (p, kind) in [("dev/sda", DevKind::Block), ("dev/mem", DevKind::Char)] {
            let node = Node::Device {
                meta: Meta::root(0o666),
                kind,
                major: 8,
                minor: 0,
            };
            t.insert(&components(p.as_bytes()).expect("p"), node, p)
                .expect("dev");
        }
        t.insert(
            &[b"fifo".to_vec()],
            Node::Fifo {
                meta: Meta::root(0o2644),
            },
            "fifo",
        )
        .expect("fifo");
        let s = t.sanitize();
        assert_eq!((s.devices, s.setid), (2, 1), "{s:?}");
        assert_eq!(s.device_examples, ["dev/mem", "dev/sda"]);
        assert!(t.lookup("dev/sda").is_none() && t.lookup("dev/mem").is_none());
        let (a, b) = match (t.lookup("bin/su"), t.lookup("bin/su2")) {
            (Some(Node::File(a)), Some(Node::File(b))) => (Arc::clone(a), Arc::clone(b)),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (a.meta.mode, a.id),
            (0o755, b.id),
            "hard link kept, bits cleared"
        );
        assert!(Arc::ptr_eq(&a, &b));
        match (t.lookup("d"), t.lookup("fifo")) {
            (Some(Node::Dir { meta: d, .. }), Some(Node::Fifo { meta: f })) => {
                assert_eq!((d.mode, f.mode), (0o2775, 0o644));
            }
            other => panic!("{other:?}"),
        }
    }
}
