//! The merged file tree of an image, built from tar headers only (no content): layers are
//! applied in order with OCI whiteouts (image-spec `layer.md`), and every surviving file
//! remembers which layer entry holds its bytes, so the second pass can stream them.

use std::collections::BTreeMap;
use std::rc::Rc;

mod view;

pub use view::{Item, NodeKind};

use super::path::{normalize, PathError};
use super::tar::{Header, Kind};
use super::xattr::Xattr;
use crate::limits::{Budget, LimitError};

/// Index of a node in the tree.
pub type NodeId = usize;

/// Index of a file's content (shared by hard links).
pub type InodeId = usize;

/// The root directory's node.
pub const ROOT: NodeId = 0;

/// `.wh.NAME` hides NAME of lower layers (image-spec `layer.md`, "Whiteouts").
const WHITEOUT_PREFIX: &str = ".wh.";

/// `.wh..wh..opq` hides every lower entry of its directory ("Opaque Whiteout"); what
/// follows the first `.wh.`.
const OPAQUE_SUFFIX: &str = ".wh..opq";

/// Rough bytes one node costs beyond its name, charged to the tree budget.
const NODE_COST: usize = 96;

/// Rough bytes one kept extended attribute costs beyond its name and value.
const XATTR_COST: usize = 32;

/// Why an entry cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The member name is unsafe or malformed.
    #[error("bad name")]
    Path(#[from] PathError),
    /// A cap was hit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A hard link's target name is unsafe or malformed.
    #[error("bad hard link target")]
    LinkTarget(#[source] PathError),
    /// A hard link names nothing that exists at that point (missing or whited out).
    #[error("hard link target {0:?} does not exist")]
    MissingLinkTarget(String),
    /// A hard link names a directory.
    #[error("hard link target {0:?} is a directory")]
    LinkToDirectory(String),
    /// `.wh.`, `.wh..` or `.wh...`: a whiteout of its own directory or above.
    #[error("whiteout names its own directory or a parent")]
    WhiteoutOfDirectory,
    /// `./` is something other than a directory.
    #[error("the image root is not a directory")]
    RootNotDirectory,
    /// A symlink target is empty, has a NUL byte or is not UTF-8.
    #[error("symlink target is empty, has a NUL byte or is not UTF-8")]
    BadSymlink,
    /// A uid or gid does not fit newc's 32-bit fields.
    #[error("owner id {0} does not fit 32 bits")]
    IdTooLarge(u64),
}

/// Ownership, permissions and time of an entry, as newc stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (clamped to newc's unsigned 32 bits).
    pub mtime: u32,
}

impl Meta {
    /// Parents a layer implies without an entry of their own (as containerd creates them).
    const IMPLICIT_DIR: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };

    fn from_header(header: &Header) -> Result<Self, TreeError> {
        let id = |value: u64| u32::try_from(value).map_err(|_| TreeError::IdTooLarge(value));
        Ok(Meta {
            mode: header.mode,
            uid: id(header.uid)?,
            gid: id(header.gid)?,
            mtime: u32::try_from(header.mtime.max(0)).unwrap_or(u32::MAX),
        })
    }
}

/// The bytes of one surviving file: where they are and who shares them.
#[derive(Debug)]
pub struct Inode {
    /// Layer holding the content.
    pub layer: usize,
    /// Index of the member within that layer.
    pub ordinal: u64,
    /// Content length the header declared.
    pub size: u64,
    /// Metadata of the member that created the file.
    pub meta: Meta,
    /// Extended attributes of that member.
    pub xattrs: Box<[Xattr]>,
    /// Surviving names (filled by [`Tree::finish`]); more than one means hard links.
    pub names: Vec<NodeId>,
}

enum Body {
    Dir(BTreeMap<Rc<str>, NodeId>),
    File(InodeId),
    Symlink(Box<str>),
    Fifo,
    /// Device nodes: they hide what was below but are not written (devtmpfs provides
    /// devices in the guest).
    Omitted,
    Removed,
}

struct Node {
    name: Rc<str>,
    parent: NodeId,
    /// Last layer that named this node or something below it; whiteouts only hide
    /// nodes of lower layers.
    layer: usize,
    meta: Meta,
    /// Extended attributes (empty for files: their inode holds them).
    xattrs: Box<[Xattr]>,
    body: Body,
}

/// The merged tree of all layers applied so far.
pub struct Tree {
    nodes: Vec<Node>,
    inodes: Vec<Inode>,
    wanted: Vec<Vec<(u64, InodeId)>>,
    /// Device nodes seen (never written).
    pub devices: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: vec![Node {
                name: Rc::from(""),
                parent: ROOT,
                layer: 0,
                meta: Meta::IMPLICIT_DIR,
                xattrs: Box::default(),
                body: Body::Dir(BTreeMap::new()),
            }],
            inodes: Vec::new(),
            wanted: Vec::new(),
            devices: 0,
        }
    }
}

impl Tree {
    /// Applies one member of `layer` (its `ordinal`-th member) on top of the tree.
    pub fn apply(
        &mut self,
        layer: usize,
        ordinal: u64,
        header: &Header,
        budget: &mut Budget,
    ) -> Result<(), TreeError> {
        let path = normalize(&header.path, budget)?;
        let Some((base, parents)) = path.split_last() else {
            // `./`: the initramfs root is the kernel's rootfs; its metadata is not ours.
            return match header.kind {
                Kind::Directory => Ok(()),
                _ => Err(TreeError::RootNotDirectory),
            };
        };
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parents, hidden, layer);
        }
        let parent = self.ensure_dirs(parents, layer, budget)?;
        let mut meta = Meta::from_header(header)?;
        let mut xattrs = charge_xattrs(&header.xattrs, budget)?;
        let body = match header.kind {
            Kind::Directory => {
                if let Some(id) = self.existing_dir(parent, base) {
                    let node = &mut self.nodes[id];
                    node.meta = meta;
                    node.xattrs = xattrs;
                    node.layer = layer;
                    return Ok(());
                }
                Body::Dir(BTreeMap::new())
            }
            Kind::File => {
                self.inodes.push(Inode {
                    layer,
                    ordinal,
                    size: header.size,
                    meta,
                    xattrs: std::mem::take(&mut xattrs),
                    names: Vec::new(),
                });
                Body::File(self.inodes.len() - 1)
            }
            Kind::Symlink => Body::Symlink(symlink_target(&header.link, budget)?),
            Kind::Fifo => Body::Fifo,
            Kind::Device => {
                self.devices += 1;
                Body::Omitted
            }
            Kind::HardLink => {
                let (body, target_meta, target_xattrs) = self.link_target(&header.link, budget)?;
                if let Body::Symlink(target) = &body {
                    budget.charge_tree(target.len())?;
                }
                meta = target_meta;
                // A link to a file shares its inode (and its xattrs); a copied symlink
                // or fifo copies the target's.
                xattrs = charge_xattrs(&target_xattrs, budget)?;
                body
            }
        };
        self.put(parent, base, layer, meta, xattrs, body, budget)?;
        Ok(())
    }

    /// Walks to the directory `names` below the root, creating missing directories and
    /// replacing non-directories in the way (overlayfs semantics: an upper directory
    /// hides a lower file or symlink; nothing is ever written through a symlink).
    fn ensure_dirs(
        &mut self,
        names: &[String],
        layer: usize,
        budget: &mut Budget,
    ) -> Result<NodeId, TreeError> {
        let mut dir = ROOT;
        for name in names {
            dir = match self.existing_dir(dir, name) {
                Some(id) => {
                    self.nodes[id].layer = layer;
                    id
                }
                None => {
                    let body = Body::Dir(BTreeMap::new());
                    let xattrs = Box::default();
                    self.put(dir, name, layer, Meta::IMPLICIT_DIR, xattrs, body, budget)?
                }
            };
        }
        Ok(dir)
    }

    /// Applies `.wh.HIDDEN` in the directory `parents`. A whiteout only ever hides: when
    /// its directory is missing or is not a directory (diff tools such as umoci write
    /// whiteouts of a replaced directory's old children after the symlink that replaced
    /// it), it does nothing, and nothing is created or followed.
    fn whiteout(
        &mut self,
        parents: &[String],
        hidden: &str,
        layer: usize,
    ) -> Result<(), TreeError> {
        if matches!(hidden, "" | "." | "..") {
            return Err(TreeError::WhiteoutOfDirectory);
        }
        if hidden != OPAQUE_SUFFIX && hidden.starts_with(WHITEOUT_PREFIX) {
            // Other aufs metadata (`.wh..wh.plnk`...) carries nothing for us.
            return Ok(());
        }
        let Some(dir) = self.find_dir(parents, layer) else {
            return Ok(());
        };
        if hidden == OPAQUE_SUFFIX {
            self.prune_children(dir, layer);
        } else if let Some(id) = self.child(dir, hidden) {
            self.prune(id, layer);
        }
        Ok(())
    }

    /// The existing directory `names` below the root, marking the way as named by `layer`
    /// (the whiteout lives in that layer's copy of each); `None` if missing or not a
    /// directory.
    fn find_dir(&mut self, names: &[String], layer: usize) -> Option<NodeId> {
        let mut dir = ROOT;
        for name in names {
            dir = self.existing_dir(dir, name)?;
            self.nodes[dir].layer = layer;
        }
        Some(dir)
    }

    /// Hides what lower layers put at `id`: removed entirely when no member of `layer`
    /// named it or anything below it, otherwise only its lower descendants go.
    fn prune(&mut self, id: NodeId, layer: usize) {
        if self.nodes[id].layer < layer {
            self.remove(id);
        } else {
            self.prune_children(id, layer);
        }
    }

    fn prune_children(&mut self, dir: NodeId, layer: usize) {
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let Body::Dir(children) = &self.nodes[dir].body else {
                continue;
            };
            let children: Vec<NodeId> = children.values().copied().collect();
            for child in children {
                if self.nodes[child].layer < layer {
                    self.remove(child);
                } else {
                    stack.push(child);
                }
            }
        }
    }

    /// Resolves a hard link's target as it is now: the link shares the target's inode
    /// (a later whiteout of the target leaves the link intact, as on any filesystem).
    /// Links to symlinks and fifos become copies; newc links regular files only.
    fn link_target(
        &self,
        raw: &[u8],
        budget: &Budget,
    ) -> Result<(Body, Meta, Vec<Xattr>), TreeError> {
        let path = normalize(raw, budget).map_err(TreeError::LinkTarget)?;
        let shown = || path.join("/");
        let id = self
            .lookup(&path)
            .ok_or_else(|| TreeError::MissingLinkTarget(shown()))?;
        let node = &self.nodes[id];
        let mut xattrs = node.xattrs.to_vec();
        let body = match &node.body {
            Body::File(inode) => {
                xattrs = Vec::new();
                Body::File(*inode)
            }
            Body::Symlink(target) => Body::Symlink(target.clone()),
            Body::Fifo => Body::Fifo,
            Body::Omitted => Body::Omitted,
            Body::Dir(_) => return Err(TreeError::LinkToDirectory(shown())),
            Body::Removed => return Err(TreeError::MissingLinkTarget(shown())),
        };
        Ok((body, node.meta, xattrs))
    }

    /// Puts `body` at `name` in `dir`, replacing (and freeing) whatever was there.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        dir: NodeId,
        name: &str,
        layer: usize,
        meta: Meta,
        xattrs: Box<[Xattr]>,
        body: Body,
        budget: &mut Budget,
    ) -> Result<NodeId, TreeError> {
        if let Some(id) = self.child(dir, name) {
            self.free_descendants(id);
            let node = &mut self.nodes[id];
            node.layer = layer;
            node.meta = meta;
            node.xattrs = xattrs;
            node.body = body;
            return Ok(id);
        }
        budget.charge_tree(NODE_COST + name.len())?;
        let name: Rc<str> = Rc::from(name);
        let id = self.nodes.len();
        self.nodes.push(Node {
            name: name.clone(),
            parent: dir,
            layer,
            meta,
            xattrs,
            body,
        });
        if let Body::Dir(children) = &mut self.nodes[dir].body {
            children.insert(name, id);
        }
        Ok(id)
    }

    fn remove(&mut self, id: NodeId) {
        let parent = self.nodes[id].parent;
        let name = self.nodes[id].name.clone();
        if let Body::Dir(children) = &mut self.nodes[parent].body {
            children.remove(&name);
        }
        self.free_descendants(id);
        self.nodes[id].body = Body::Removed;
    }

    /// Frees everything below `id` (the node itself is the caller's to reuse or remove).
    fn free_descendants(&mut self, id: NodeId) {
        let mut stack: Vec<NodeId> = match &mut self.nodes[id].body {
            Body::Dir(children) => std::mem::take(children).into_values().collect(),
            _ => return,
        };
        while let Some(id) = stack.pop() {
            if let Body::Dir(children) = &mut self.nodes[id].body {
                stack.extend(std::mem::take(children).into_values());
            }
            self.nodes[id].body = Body::Removed;
        }
    }

    fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        match &self.nodes[dir].body {
            Body::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    fn existing_dir(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.child(dir, name)
            .filter(|&id| matches!(self.nodes[id].body, Body::Dir(_)))
    }

    /// The node at `path`, following directories only (never symlinks).
    fn lookup(&self, path: &[String]) -> Option<NodeId> {
        path.iter()
            .try_fold(ROOT, |dir, name| self.child(dir, name))
    }

    /// Ends the first pass: records every surviving name of each file and which members
    /// of each layer the second pass must copy.
    pub fn finish(&mut self, layers: usize) {
        self.wanted = vec![Vec::new(); layers];
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            match &self.nodes[id].body {
                // Reversed so the stack pops names in sorted order.
                Body::Dir(children) => stack.extend(children.values().rev().copied()),
                Body::File(inode) => self.inodes[*inode].names.push(id),
                _ => {}
            }
        }
        for (id, inode) in self.inodes.iter().enumerate() {
            if !inode.names.is_empty() {
                if let Some(wanted) = self.wanted.get_mut(inode.layer) {
                    wanted.push((inode.ordinal, id));
                }
            }
        }
        for wanted in &mut self.wanted {
            wanted.sort_unstable();
        }
    }
}

/// Keeps `xattrs`, charging their memory to the tree budget (they are untrusted input,
/// up to 64 KiB per entry).
fn charge_xattrs(xattrs: &[Xattr], budget: &mut Budget) -> Result<Box<[Xattr]>, TreeError> {
    for xattr in xattrs {
        budget.charge_tree(XATTR_COST + xattr.name.len() + xattr.value.len())?;
    }
    Ok(xattrs.into())
}

fn symlink_target(raw: &[u8], budget: &mut Budget) -> Result<Box<str>, TreeError> {
    if raw.is_empty() || raw.contains(&0) {
        return Err(TreeError::BadSymlink);
    }
    budget.check_name_length(raw.len())?;
    budget.charge_tree(raw.len())?;
    let target = std::str::from_utf8(raw).map_err(|_| TreeError::BadSymlink)?;
    Ok(target.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;

    fn entry(path: &str, kind: Kind) -> Header {
        Header {
            path: path.as_bytes().to_vec(),
            link: Vec::new(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            xattrs: Vec::new(),
        }
    }

    fn file(path: &str) -> Header {
        entry(path, Kind::File)
    }

    fn dir(path: &str) -> Header {
        entry(path, Kind::Directory)
    }

    fn link(path: &str, kind: Kind, target: &str) -> Header {
        Header {
            link: target.as_bytes().to_vec(),
            ..entry(path, kind)
        }
    }

    fn merge(layers: &[&[Header]]) -> Result<Tree, TreeError> {
        merge_with(layers, Limits::default())
    }

    fn merge_with(layers: &[&[Header]], limits: Limits) -> Result<Tree, TreeError> {
        let mut budget = Budget::new(limits);
        let mut tree = Tree::default();
        for (layer, headers) in layers.iter().enumerate() {
            for (ordinal, header) in headers.iter().enumerate() {
                tree.apply(layer, ordinal as u64, header, &mut budget)?;
            }
        }
        tree.finish(layers.len());
        Ok(tree)
    }

    /// Sorted listing: `dir/`, `link->target`, `fifo|`, `file=layer:ordinal`.
    fn listing(tree: &Tree) -> Vec<String> {
        let mut out = Vec::new();
        tree.walk(|path, _, item| -> Result<(), ()> {
            out.push(match item {
                Item::Dir => format!("{path}/"),
                Item::Symlink(target) => format!("{path}->{target}"),
                Item::Fifo => format!("{path}|"),
            });
            Ok(())
        })
        .expect("walk");
        for layer in 0..tree.wanted.len() {
            for &(_, inode) in tree.wanted(layer) {
                let inode = tree.inode(inode);
                for &name in &inode.names {
                    out.push(format!(
                        "{}={}:{}",
                        tree.path(name),
                        inode.layer,
                        inode.ordinal
                    ));
                }
            }
        }
        out.sort();
        out
    }

    fn listed(layers: &[&[Header]]) -> Vec<String> {
        listing(&merge(layers).expect("layers merge"))
    }

    #[test]
    fn whiteout_hides_a_lower_entry_and_its_subtree() {
        let got = listed(&[
            &[dir("etc"), file("etc/a"), dir("etc/sub"), file("etc/sub/b")],
            &[file("etc/.wh.sub"), file("etc/.wh.missing")],
        ]);
        assert_eq!(got, ["etc/", "etc/a=0:1"]);
    }

    #[test]
    fn whiteout_never_hides_its_own_layer() {
        // image-spec layer.md: whiteouts only apply to lower layers.
        let got = listed(&[
            &[file("a"), file("b")],
            &[file("a"), file(".wh.a"), file(".wh.b")],
        ]);
        assert_eq!(got, ["a=1:0"]);
        let got = listed(&[&[dir("d"), file("d/old")], &[file("d/new"), file(".wh.d")]]);
        assert_eq!(got, ["d/", "d/new=1:0"]);
    }

    #[test]
    fn opaque_directory_hides_lower_contents_in_either_order() {
        let lower: &[Header] = &[
            dir("d"),
            file("d/old"),
            dir("d/x"),
            file("d/x/deep"),
            file("keep"),
        ];
        let before = listed(&[
            lower,
            &[
                dir("d"),
                file("d/.wh..wh..opq"),
                file("d/new"),
                file("d/x/n"),
            ],
        ]);
        let after = listed(&[
            lower,
            &[
                dir("d"),
                file("d/new"),
                file("d/x/n"),
                file("d/.wh..wh..opq"),
            ],
        ]);
        assert_eq!(before, ["d/", "d/new=1:2", "d/x/", "d/x/n=1:3", "keep=0:4"]);
        assert_eq!(after, ["d/", "d/new=1:1", "d/x/", "d/x/n=1:2", "keep=0:4"]);
    }

    #[test]
    fn opaque_marker_alone_leaves_an_empty_directory() {
        let got = listed(&[&[dir("d"), file("d/old")], &[file("d/.wh..wh..opq")]]);
        assert_eq!(got, ["d/"]);
    }

    #[test]
    fn file_replaces_directory_and_back() {
        let got = listed(&[
            &[dir("x"), file("x/inner"), file("y")],
            &[file("x"), dir("y"), file("y/child")],
        ]);
        assert_eq!(got, ["x=1:0", "y/", "y/child=1:2"]);
        let got = listed(&[
            &[dir("x"), file("x/inner")],
            &[file("x")],
            &[dir("x"), file("x/again")],
        ]);
        assert_eq!(got, ["x/", "x/again=2:1"]);
    }

    #[test]
    fn duplicates_in_one_layer_last_wins() {
        let got = listed(&[&[file("a"), file("a"), dir("b"), file("b")]]);
        assert_eq!(got, ["a=0:1", "b=0:3"]);
    }

    #[test]
    fn hard_link_to_lower_layer_survives_whiteout_of_its_target() {
        let got = listed(&[
            &[dir("bin"), file("bin/a")],
            &[link("bin/b", Kind::HardLink, "bin/a")],
            &[file("bin/.wh.a")],
        ]);
        assert_eq!(got, ["bin/", "bin/b=0:1"]);
    }

    #[test]
    fn hard_link_shares_the_target_as_it_is_when_linked() {
        let tree =
            merge(&[&[file("a")], &[file("a"), link("b", Kind::HardLink, "./a")]]).expect("merge");
        assert_eq!(listing(&tree), ["a=1:0", "b=1:0"]);
        let (_, inode) = tree.wanted(1)[0];
        assert_eq!(tree.inode(inode).names.len(), 2, "one inode, two names");
        assert!(tree.wanted(0).is_empty(), "the replaced file is not copied");
    }

    #[test]
    fn hard_links_to_missing_or_directories_are_errors() {
        let missing = merge(&[&[link("b", Kind::HardLink, "nope")]]);
        assert!(matches!(missing, Err(TreeError::MissingLinkTarget(_))));
        let whited_out = merge(&[
            &[file("a")],
            &[file(".wh.a"), link("b", Kind::HardLink, "a")],
        ]);
        assert!(matches!(whited_out, Err(TreeError::MissingLinkTarget(_))));
        let to_dir = merge(&[&[dir("d"), link("b", Kind::HardLink, "d")]]);
        assert!(matches!(to_dir, Err(TreeError::LinkToDirectory(_))));
        let escaping = merge(&[&[link("b", Kind::HardLink, "../../etc/shadow")]]);
        assert!(matches!(
            escaping,
            Err(TreeError::LinkTarget(PathError::Escapes))
        ));
        let absolute = merge(&[&[link("b", Kind::HardLink, "/etc/shadow")]]);
        assert!(matches!(
            absolute,
            Err(TreeError::LinkTarget(PathError::Absolute))
        ));
    }

    #[test]
    fn hard_link_to_a_symlink_or_through_one_is_never_followed() {
        let got = listed(&[&[
            link("s", Kind::Symlink, "/etc"),
            link("h", Kind::HardLink, "s"),
        ]]);
        assert_eq!(got, ["h->/etc", "s->/etc"]);
        let through = merge(&[&[
            link("s", Kind::Symlink, "d"),
            dir("d"),
            file("d/f"),
            link("h", Kind::HardLink, "s/f"),
        ]]);
        assert!(matches!(through, Err(TreeError::MissingLinkTarget(_))));
    }

    #[test]
    fn entries_below_a_lower_symlink_replace_it_instead_of_writing_through() {
        let got = listed(&[
            &[
                link("evil", Kind::Symlink, "../../../etc"),
                dir("usr"),
                dir("usr/lib"),
                file("usr/lib/x"),
                link("lib", Kind::Symlink, "usr/lib"),
            ],
            &[file("evil/passwd"), file("lib/foo")],
        ]);
        assert_eq!(
            got,
            [
                "evil/",
                "evil/passwd=1:0",
                "lib/",
                "lib/foo=1:1",
                "usr/",
                "usr/lib/",
                "usr/lib/x=0:3"
            ]
        );
    }

    #[test]
    fn devices_are_left_out_but_hide_what_was_below() {
        let tree = merge(&[
            &[dir("dev"), file("dev/null")],
            &[
                entry("dev/null", Kind::Device),
                entry("dev/sda", Kind::Device),
                entry("run/fifo", Kind::Fifo),
            ],
        ])
        .expect("merge");
        assert_eq!(listing(&tree), ["dev/", "run/", "run/fifo|"]);
        assert_eq!(tree.devices, 2);
    }

    #[test]
    fn whiteouts_of_the_directory_itself_are_errors_and_root_entries_are_checked() {
        for name in [".wh.", ".wh..", "a/.wh..", "a/.wh..."] {
            let got = merge(&[&[file(name)]]);
            assert!(matches!(got, Err(TreeError::WhiteoutOfDirectory)), "{name}");
        }
        assert_eq!(
            listed(&[&[dir("./"), dir("."), dir("a"), file("a/.wh..wh.plnk")]]),
            ["a/"]
        );
        assert!(matches!(
            merge(&[&[file("./")]]),
            Err(TreeError::RootNotDirectory)
        ));
    }

    #[test]
    fn whiteouts_never_create_or_go_through_non_directories() {
        // umoci's diff of "directory replaced by a symlink": the symlink, then whiteouts
        // of the old children below it. The symlink must survive.
        let got = listed(&[
            &[
                dir("www"),
                dir("www/html"),
                file("www/html/index"),
                dir("srv"),
            ],
            &[
                link("www/html", Kind::Symlink, "/srv"),
                file("www/html/.wh.index"),
                file("www/html/.wh..wh..opq"),
                file("missing/dir/.wh.x"),
            ],
        ]);
        assert_eq!(got, ["srv/", "www/", "www/html->/srv"]);
    }

    #[test]
    fn root_opaque_marker_hides_every_lower_layer() {
        let got = listed(&[
            &[dir("a"), file("a/x"), file("b")],
            &[file(".wh..wh..opq"), file("c")],
        ]);
        assert_eq!(got, ["c=1:1"]);
    }

    #[test]
    fn metadata_is_kept_exactly() {
        let mut suid = file("bin/su");
        suid.mode = 0o4755;
        suid.uid = 4_000_000_000;
        suid.gid = 42;
        suid.mtime = -5;
        let tree = merge(&[&[suid]]).expect("merge");
        let (_, inode) = tree.wanted(0)[0];
        let meta = tree.inode(inode).meta;
        assert_eq!(
            (meta.mode, meta.uid, meta.gid, meta.mtime),
            (0o4755, 4_000_000_000, 42, 0)
        );
        let mut huge = file("x");
        huge.uid = 1 << 32;
        assert!(matches!(merge(&[&[huge]]), Err(TreeError::IdTooLarge(_))));
    }

    #[test]
    fn xattrs_follow_their_entries() {
        let x = |value: &str| {
            vec![Xattr {
                name: (*b"user.v").into(),
                value: value.as_bytes().into(),
            }]
        };
        let with = |header: Header, value: &str| Header {
            xattrs: x(value),
            ..header
        };
        let tree = merge(&[
            &[
                with(dir("d"), "lower dir"),
                with(file("d/f"), "file"),
                link("d/h", Kind::HardLink, "d/f"),
                with(link("s", Kind::Symlink, "d"), "symlink"),
                link("s2", Kind::HardLink, "s"),
                with(entry("p", Kind::Fifo), "fifo"),
            ],
            &[with(dir("d"), "upper dir")],
        ])
        .expect("merge");
        let value = |path: &[&str]| {
            let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            let (_, _, xattrs) = tree
                .node(tree.lookup(&path).expect("exists"))
                .expect("shown");
            xattrs.iter().map(|x| x.value.to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(value(&["d"]), [b"upper dir".to_vec()]);
        assert_eq!(value(&["d", "f"]), [b"file".to_vec()]);
        assert_eq!(
            value(&["d", "h"]),
            [b"file".to_vec()],
            "hard link shares the inode"
        );
        assert_eq!(value(&["s"]), [b"symlink".to_vec()]);
        assert_eq!(
            value(&["s2"]),
            [b"symlink".to_vec()],
            "copied with the symlink"
        );
        assert_eq!(value(&["p"]), [b"fifo".to_vec()]);
        let limits = Limits {
            tree_bytes: 1000,
            ..Limits::default()
        };
        let big = Header {
            xattrs: vec![Xattr {
                name: (*b"user.big").into(),
                value: vec![0; 2000].into(),
            }],
            ..file("f")
        };
        assert!(matches!(
            merge_with(&[&[big]], limits),
            Err(TreeError::Limit(LimitError::TreeBytes(_)))
        ));
    }

    #[test]
    fn bad_symlinks_are_errors() {
        assert!(matches!(
            merge(&[&[link("s", Kind::Symlink, "")]]),
            Err(TreeError::BadSymlink)
        ));
        assert!(matches!(
            merge(&[&[link("s", Kind::Symlink, "a\0b")]]),
            Err(TreeError::BadSymlink)
        ));
    }

    #[test]
    fn tree_memory_is_capped() {
        let limits = Limits {
            tree_bytes: 10 * (NODE_COST as u64 + 8),
            ..Limits::default()
        };
        let headers: Vec<Header> = (0..100).map(|i| file(&format!("f{i:07}"))).collect();
        let got = merge_with(&[&headers], limits);
        assert!(matches!(
            got,
            Err(TreeError::Limit(LimitError::TreeBytes(_)))
        ));
    }
}
