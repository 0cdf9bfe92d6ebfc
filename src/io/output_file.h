// Writing output files safely (the project's standard for every file diffuse writes).
//
// write_file_safely(path, ...):
//   * Symlinks are followed, never replaced: the file a link points to is written (a dangling
//     link: the path it points to is created).
//   * An existing target that is not a regular file (a character device such as /dev/null or
//     /dev/stdout, a FIFO, a socket, a block device) is opened for writing in place
//     (O_WRONLY, no truncation, no rename) and the bytes are written to it. Opening a FIFO
//     blocks until a reader opens it, as a shell redirection would.
//   * A regular file or a new file is replaced atomically: the bytes go into a unique temporary
//     file in the target's folder (mkstemp, "<dir>/.<name>.XXXXXX"), which is flushed, fsynced,
//     given the existing file's permission bits (or 0666 & ~umask for a new file; ownership is
//     kept where the process may) and renamed over the target. Readers see either the old file
//     or the complete new one; an unrelated "<name>.tmp" of the user's is never touched.
//   * On failure the temporary file is removed and diffuse::Error is thrown:
//     "<path>: cannot write: <reason>". When the temporary file cannot be created the reason
//     reads "cannot create a temporary file in <dir>: <strerror>".
#pragma once
#include <cstddef>
#include <cstdio>
#include <functional>
#include <string>

namespace diffuse {

void write_file_safely(const std::string& path, const void* data, size_t size);

// For many files in one go (a generated dataset): WriteSync::Later skips the per-file fsync of the
// temporary file and of its folder (each file still appears complete or not at all, through the
// rename); the writer calls sync_written_files once at the end to make them all durable.
enum class WriteSync { Each, Later };
void write_file_safely(const std::string& path, const void* data, size_t size, WriteSync sync);
// Flushes the file system holding `dir` (syncfs), e.g. after writes with WriteSync::Later.
// Throws diffuse::Error "<dir>: cannot sync: <reason>".
void sync_written_files(const std::string& dir);

// Streaming form: `writer` writes the whole content to the FILE* it is given (the temporary file,
// or the special file opened in place) with stdio calls. It may stop early after a failed write:
// write_file_safely checks ferror() afterwards. An exception from `writer` removes the temporary
// file and propagates unchanged.
void write_file_safely(const std::string& path, const std::function<void(FILE*)>& writer);

// Checks, before long work, that write_file_safely(path) can succeed as far as the file system
// says now. Throws diffuse::Error "<what> <path>: <problem>" when the path is empty, is a folder,
// its folder does not exist (or is not a folder), the existing target is not writable, or the
// folder is not writable where a file must be created in it (a new file, or a regular file that
// is replaced through a temporary file). A special file (see is_special_output) needs only to be
// writable itself. Permission checks use access(), so root passes them as the kernel would.
void check_output_writable(const std::string& path, const std::string& what);

// True when `path` exists (following symlinks) and is not a regular file: a character or block
// device, a FIFO, a socket, or a folder. Such outputs are written in place, not replaced.
bool is_special_output(const std::string& path);

// For programs (the CLI): SIGINT, SIGTERM, SIGHUP and SIGQUIT first remove the temporary file
// write_file_safely is writing, if any, then take their default action. A library leaves signals
// to its host.
void install_output_cleanup();

// An input path is checked before it is opened: a FIFO, device or socket would block or never end,
// so anything but a regular file (or, with folder_ok, a folder) is refused. Throws diffuse::Error
// "<what> <path>: ..." (FileError when it does not exist).
void check_input_file(const std::string& path, const std::string& what, bool folder_ok = false);

}  // namespace diffuse
