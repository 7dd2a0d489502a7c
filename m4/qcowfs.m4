# qcowfs.m4 - configure helpers of qcowfs                     -*- Autoconf -*-
#
# Written for qcowfs.  Kept tiny on purpose: everything here exists so that
# configure.ac reads as a list of decisions, not of shell plumbing.

# QCOWFS_REQUIRE_PKG(VARIABLE-PREFIX, MODULE-SPEC, DEBIAN-PACKAGE)
# ----------------------------------------------------------------
# PKG_CHECK_MODULES, except that a missing module stops configure with a
# message naming the Debian/Ubuntu package that provides it, because "No
# package 'jemalloc' found" alone does not tell a user what to install.
AC_DEFUN([QCOWFS_REQUIRE_PKG],
[PKG_CHECK_MODULES([$1], [$2], [],
  [AC_MSG_ERROR([pkg-config could not find $2:
$$1_PKG_ERRORS
On Debian or Ubuntu install it with:  apt-get install $3
(or pass $1_CFLAGS and $1_LIBS to configure by hand)])])
])

# QCOWFS_CHECK_FLAGS(FLAGS, [ACTION-IF-ACCEPTED], [ACTION-IF-REJECTED])
# ---------------------------------------------------------------------
# Whether the C compiler both compiles and links a trivial program with
# FLAGS added to CFLAGS and LDFLAGS (sanitizers need the runtime library
# at link time, so a compile-only test would accept flags that then break
# the first real link).
AC_DEFUN([QCOWFS_CHECK_FLAGS],
[AS_VAR_PUSHDEF([qcowfs_cache], [qcowfs_cv_flags_$1])dnl
AC_CACHE_CHECK([whether $CC accepts $1], [qcowfs_cache],
  [qcowfs_save_CFLAGS=$CFLAGS
   qcowfs_save_LDFLAGS=$LDFLAGS
   CFLAGS="$CFLAGS $1"
   LDFLAGS="$LDFLAGS $1"
   AC_LINK_IFELSE([AC_LANG_PROGRAM([], [return 0;])],
     [AS_VAR_SET([qcowfs_cache], [yes])],
     [AS_VAR_SET([qcowfs_cache], [no])])
   CFLAGS=$qcowfs_save_CFLAGS
   LDFLAGS=$qcowfs_save_LDFLAGS])
AS_VAR_IF([qcowfs_cache], [yes], [$2], [$3])
AS_VAR_POPDEF([qcowfs_cache])dnl
])
