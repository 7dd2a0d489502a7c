/*
 * cmd_info_blocks.c - the output of "qcowctl info": one function per
 * block, each writing text and JSON.
 *
 * qcowctl info shows what "qemu-img info" shows for the same image, in the
 * same order and, with --json, with the same key names and nesting
 * (ImageInfo of QEMU's QAPI schema); --backing-chain shows every image of
 * the chain, top first, as "qemu-img info --backing-chain" does.  What
 * qemu-img leaves out and a qcowfs user wants (table offsets, feature
 * bits, the file size) comes after it: "qcowfs details:" in the text, a
 * "qcowfs" object in JSON, so that no qemu-img key changes meaning.
 *
 * One function per block of the output (info_block_*), each writing both
 * forms through struct info_out, so that a new block (the bitmaps, the
 * external data file) is one new function called at its place.
 *
 * Rules:
 *  - Reads only struct info_image (cmd_info.c fills it); never opens or
 *    reads a file.
 */

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "qcow.h"
#include "qcowctl.h"
#include "cmd_info.h"

/* Header feature bits (qcow2 spec), named for the output. */
#define INCOMPAT_EXTENDED_L2       (1ULL << 4)
#define COMPAT_LAZY_REFCOUNTS      (1ULL << 0)

static void out_str(struct info_out *o, const char *text_key, const char *json_key, const char *value)
{
	if (o->json)
		json_string(&o->j, json_key, value);
	else
		printf("%*s%s: %s\n", o->indent, "", text_key, value);
}

static void out_bool(struct info_out *o, const char *text_key, const char *json_key, bool value)
{
	if (o->json)
		json_bool(&o->j, json_key, value);
	else
		printf("%*s%s: %s\n", o->indent, "", text_key, value ? "true" : "false");
}

static void out_u64(struct info_out *o, const char *text_key, const char *json_key, uint64_t value)
{
	if (o->json)
		json_u64(&o->j, json_key, value);
	else
		printf("%*s%s: %" PRIu64 "\n", o->indent, "", text_key, value);
}

/* A nested object: "text_key:" with its lines indented below it. */
static void out_section_begin(struct info_out *o, const char *text_key, const char *json_key)
{
	if (o->json) {
		json_object_begin(&o->j, json_key);
	} else {
		printf("%*s%s:\n", o->indent, "", text_key);
		o->indent += 4;
	}
}

static void out_section_end(struct info_out *o)
{
	if (o->json)
		json_object_end(&o->j);
	else
		o->indent -= 4;
}


static const char *info_compat_name(const struct qcow_info *info)
{
	return info->version == 2 ? "0.10" : "1.1";
}

/* The types the format defines (header byte 104); QEMU refuses others. */
static const char *info_compression_name(const struct qcow_info *info)
{
	switch (info->compression_type) {
	case 0: return "zlib";
	case 1: return "zstd";
	default: return "unknown";
	}
}

/* QEMU's names of the encryption methods (header offset 32). */
static const char *info_encrypt_format(const struct qcow_info *info)
{
	switch (info->crypt_method) {
	case 1: return "aes";
	case 2: return "luks";
	default: return "unknown";
	}
}


/* image, file format, sizes, encryption, cluster size, the dirty flag
 * (the JSON has it as "dirty-flag", after the format-specific data). */
static void info_block_general(struct info_out *o, const struct info_image *im)
{
	char text[128];
	bool encrypted = info_is_qcow2(im) && im->q.crypt_method != 0;

	if (o->json) {
		json_u64(&o->j, "virtual-size", im->virtual_size);
		json_string(&o->j, "filename", im->filename);
		if (info_is_qcow2(im))
			json_u64(&o->j, "cluster-size", (uint64_t)1 << im->q.cluster_bits);
		json_string(&o->j, "format", im->format);
		json_u64(&o->j, "actual-size", im->actual_size);
		if (encrypted)
			json_bool(&o->j, "encrypted", true);
		return;
	}
	printf("image: %s\n", im->filename);
	printf("file format: %s\n", im->format);
	ctl_format_size_and_bytes(im->virtual_size, text, sizeof(text));
	printf("virtual size: %s\n", text);
	ctl_format_human_size(im->actual_size, text, sizeof(text));
	printf("disk size: %s\n", text);
	if (encrypted)
		printf("encrypted: yes\n");
	if (info_is_qcow2(im))
		printf("cluster_size: %" PRIu64 "\n", (uint64_t)1 << im->q.cluster_bits);
	if (info_is_qcow2(im) && im->q.dirty)
		printf("cleanly shut down: no\n");
}

/* The backing file as the header names it, where QEMU finds it, and its
 * format from the backing format extension. */
static void info_block_backing(struct info_out *o, const struct info_image *im)
{
	if (!info_is_qcow2(im) || !im->q.backing_file[0])
		return;
	if (o->json) {
		json_string(&o->j, "backing-filename", im->q.backing_file);
		json_string(&o->j, "full-backing-filename", im->full_backing);
		if (im->q.backing_format[0])
			json_string(&o->j, "backing-filename-format", im->q.backing_format);
		return;
	}
	/* names are bytes from the image: no terminal control through them */
	printf("backing file: ");
	ctl_print_text_safely(im->q.backing_file);
	if (strcmp(im->q.backing_file, im->full_backing) != 0) {
		printf(" (actual path: ");
		ctl_print_text_safely(im->full_backing);
		putchar(')');
	}
	putchar('\n');
	if (im->q.backing_format[0]) {
		printf("backing file format: ");
		ctl_print_text_safely(im->q.backing_format);
		putchar('\n');
	}
}

/* The internal snapshots: qemu-img's table (its columns and widths: rows
 * are "%-9s %-16s %8s%20s%13s%11s", so a long name shifts the rest by the
 * same amount as in qemu-img), or
 * an array of objects with QEMU's SnapshotInfo keys. */
static void info_block_snapshots(struct info_out *o, const struct info_image *im)
{
	if (!im->nb_snapshots)
		return;
	if (o->json) {
		json_array_begin(&o->j, "snapshots");
		for (uint32_t i = 0; i < im->nb_snapshots; i++) {
			const struct qcow_snapshot_info *s = &im->snapshots[i];

			json_object_begin(&o->j, NULL);
			if (s->icount >= 0)
				json_u64(&o->j, "icount", (uint64_t)s->icount);
			json_u64(&o->j, "vm-clock-nsec", s->vm_clock_nsec % 1000000000);
			json_string(&o->j, "name", s->name);
			json_u64(&o->j, "date-sec", s->date_sec);
			json_u64(&o->j, "date-nsec", s->date_nsec);
			json_u64(&o->j, "vm-clock-sec", s->vm_clock_nsec / 1000000000);
			json_string(&o->j, "id", s->id);
			json_u64(&o->j, "vm-state-size", s->vm_state_size);
			json_object_end(&o->j);
		}
		json_array_end(&o->j);
		return;
	}
	printf("Snapshot list:\n");
	printf("%-9s %-17s %7s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
	for (uint32_t i = 0; i < im->nb_snapshots; i++) {
		const struct qcow_snapshot_info *s = &im->snapshots[i];
		char size[32], date[32] = "", clock[32], icount[32] = "";
		time_t t = (time_t)s->date_sec;
		struct tm tm;
		uint64_t ms = s->vm_clock_nsec / 1000000;

		ctl_format_human_size(s->vm_state_size, size, sizeof(size));
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64,
			 ms / 3600000, ms / 60000 % 60, ms / 1000 % 60, ms % 1000);
		if (s->icount >= 0)
			snprintf(icount, sizeof(icount), "%" PRId64, s->icount);
		/* names are bytes from the image: no terminal control through them */
		ctl_print_padded_safely(s->id, 9);
		putchar(' ');
		ctl_print_padded_safely(s->name, 16);
		printf(" %8s%20s%13s%11s\n", size, date, clock, icount);
	}
}

/* The persistent dirty bitmaps (name, granularity, flags), between the
 * lazy refcounts and the refcount bits as qemu-img shows them (a list of
 * objects; the flags a list of names).  Names come from the image:
 * printed safely. */
static void info_block_bitmaps(struct info_out *o, const struct info_image *im)
{
	static const char *const flag_names[] = { "in-use", "auto" };
	if (!im->nb_bitmaps)
		return;
	if (o->json)
		json_array_begin(&o->j, "bitmaps");
	else
		printf("%*sbitmaps:\n", o->indent, "");
	for (uint32_t i = 0; i < im->nb_bitmaps; i++) {
		const struct qcow_pbitmap_info *b = &im->bitmaps[i];
		if (o->json) {
			json_object_begin(&o->j, NULL);
			json_array_begin(&o->j, "flags");
		} else {
			printf("%*s[%u]:\n%*sflags:\n", o->indent + 4, "", i, o->indent + 8, "");
		}
		for (unsigned f = 0, k = 0; f < 2; f++) {
			if (!(b->flags & (1u << f)))
				continue;
			if (o->json)
				json_string(&o->j, NULL, flag_names[f]);
			else
				printf("%*s[%u]: %s\n", o->indent + 12, "", k++, flag_names[f]);
		}
		if (o->json) {
			json_array_end(&o->j);
			json_string(&o->j, "name", b->name);
			json_u64(&o->j, "granularity", b->granularity);
			json_object_end(&o->j);
		} else {
			printf("%*sname: ", o->indent + 8, "");
			ctl_print_text_safely(b->name);
			printf("\n%*sgranularity: %" PRIu64 "\n", o->indent + 8, "", b->granularity);
		}
	}
	if (o->json)
		json_array_end(&o->j);
}

/* The external data file (data-file, data-file-raw), after the refcount
 * bits as qemu-img shows it.  The name comes from the image: printed
 * safely, as the backing file's. */
static void info_block_data_file(struct info_out *o, const struct info_image *im)
{
	if (!im->q.has_data_file)
		return;
	if (o->json) {
		json_string(&o->j, "data-file", im->q.data_file);
	} else {
		printf("%*sdata file: ", o->indent, "");
		ctl_print_text_safely(im->q.data_file);
		putchar('\n');
	}
	out_bool(o, "data file raw", "data-file-raw", im->q.data_file_raw);
}

/* The encryption format, as qemu-img names it, and for LUKS the header
 * fields qemu-img decodes, in its order (QCryptoBlockInfoLUKS). */
static void info_block_encrypt(struct info_out *o, const struct info_image *im)
{
	const struct qcow_luks_info *l = &im->luks;

	if (!im->q.crypt_method)
		return;
	out_section_begin(o, "encrypt", "encrypt");
	if (im->has_luks) {
		out_str(o, "ivgen alg", "ivgen-alg", l->ivgen_alg);
		out_str(o, "hash alg", "hash-alg", l->hash_alg);
		out_str(o, "cipher alg", "cipher-alg", l->cipher_alg);
		out_str(o, "uuid", "uuid", l->uuid);
		if (l->ivgen_hash_alg[0])
			out_str(o, "ivgen hash alg", "ivgen-hash-alg", l->ivgen_hash_alg);
	}
	out_str(o, "format", "format", info_encrypt_format(&im->q));
	if (im->has_luks) {
		out_str(o, "cipher mode", "cipher-mode", l->cipher_mode);
		if (o->json)
			json_array_begin(&o->j, "slots");
		else
			printf("%*sslots:\n", o->indent, "");
		for (unsigned i = 0; i < 8; i++) {
			if (o->json) {
				json_object_begin(&o->j, NULL);
			} else {
				printf("%*s[%u]:\n", o->indent + 4, "", i);
				o->indent += 8;
			}
			out_bool(o, "active", "active", l->slots[i].active);
			if (l->slots[i].active)
				out_u64(o, "iters", "iters", l->slots[i].iters);
			out_u64(o, "key offset", "key-offset", l->slots[i].key_offset);
			if (l->slots[i].active)
				out_u64(o, "stripes", "stripes", l->slots[i].stripes);
			if (o->json)
				json_object_end(&o->j);
			else
				o->indent -= 8;
		}
		if (o->json)
			json_array_end(&o->j);
		out_u64(o, "payload offset", "payload-offset", l->payload_offset);
		out_u64(o, "master key iters", "master-key-iters", l->master_key_iters);
	}
	out_section_end(o);
}

/* "Format specific information" / "format-specific": {"type": "qcow2",
 * "data": {...}}, keys in qemu-img's order. */
static void info_block_format_specific(struct info_out *o, const struct info_image *im)
{
	const struct qcow_info *q = &im->q;
	bool v3 = q->version >= 3;

	if (!info_is_qcow2(im))
		return;
	if (o->json) {
		json_object_begin(&o->j, "format-specific");
		json_string(&o->j, "type", "qcow2");
		json_object_begin(&o->j, "data");
	} else {
		printf("Format specific information:\n");
		o->indent += 4;
	}
	out_str(o, "compat", "compat", info_compat_name(q));
	out_str(o, "compression type", "compression-type", info_compression_name(q));
	if (v3)
		out_bool(o, "lazy refcounts", "lazy-refcounts", q->compatible_features & COMPAT_LAZY_REFCOUNTS);
	info_block_bitmaps(o, im);
	out_u64(o, "refcount bits", "refcount-bits", q->refcount_bits);
	info_block_data_file(o, im);
	info_block_encrypt(o, im);
	if (v3) {
		out_bool(o, "corrupt", "corrupt", q->corrupt);
		out_bool(o, "extended l2", "extended-l2", q->incompatible_features & INCOMPAT_EXTENDED_L2);
	}
	if (o->json) {
		json_object_end(&o->j);
		json_object_end(&o->j);
	} else {
		o->indent -= 4;
	}
}

/* What qemu-img leaves out: the file size, the tables, the feature bits. */
static void info_block_qcowfs(struct info_out *o, const struct info_image *im)
{
	const struct qcow_info *q = &im->q;
	char text[128];

	if (!info_is_qcow2(im))
		return;
	if (o->json) {
		json_object_begin(&o->j, "qcowfs");
		json_u64(&o->j, "file-size", q->file_size);
		json_u64(&o->j, "l1-table-offset", q->l1_table_offset);
		json_u64(&o->j, "l1-size", q->l1_size);
		json_u64(&o->j, "refcount-table-offset", q->refcount_table_offset);
		json_u64(&o->j, "refcount-table-clusters", q->refcount_table_clusters);
		json_u64(&o->j, "incompatible-features", q->incompatible_features);
		json_u64(&o->j, "compatible-features", q->compatible_features);
		json_u64(&o->j, "autoclear-features", q->autoclear_features);
		json_object_end(&o->j);
		return;
	}
	printf("qcowfs details:\n");
	printf("    dirty: %s\n", q->dirty ? "true" : "false");
	ctl_format_size_and_bytes(q->file_size, text, sizeof(text));
	printf("    file size: %s\n", text);
	printf("    l1 table: offset 0x%" PRIx64 ", %" PRIu32 " entries\n", q->l1_table_offset, q->l1_size);
	printf("    refcount table: offset 0x%" PRIx64 ", %" PRIu32 " cluster%s\n",
	       q->refcount_table_offset, q->refcount_table_clusters,
	       q->refcount_table_clusters == 1 ? "" : "s");
	if (q->version >= 3)
		printf("    features: incompatible 0x%" PRIx64 ", compatible 0x%" PRIx64
		       ", autoclear 0x%" PRIx64 "\n", q->incompatible_features,
		       q->compatible_features, q->autoclear_features);
}

/* One image, every block in qemu-img's order. */
void info_print(struct info_out *o, const struct info_image *im)
{
	if (o->json)
		json_object_begin(&o->j, NULL);
	info_block_general(o, im);
	info_block_backing(o, im);
	info_block_snapshots(o, im);
	info_block_format_specific(o, im);
	if (o->json)
		json_bool(&o->j, "dirty-flag", info_is_qcow2(im) && im->q.dirty);
	info_block_qcowfs(o, im);
	if (o->json)
		json_object_end(&o->j);
}
