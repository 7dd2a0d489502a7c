/*
 * cmd_image.c - the offline image commands: create and check.
 *
 * Rules:
 *  - create checks its options (cluster size, refcount width) as usage
 *    errors before it creates anything.
 *  - check's output and exit codes are those of "qemu-img check" (0 clean,
 *    1 could not run, 2 corruptions, 3 leaks only), so that scripts
 *    written for it keep working; the problems it finds are its output and
 *    go to stdout.
 */

#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow.h"
#include "qcowctl.h"

#define DEFAULT_VIRTUAL_SIZE (8ULL << 30)

/* qemu-img check's exit codes. */
enum check_exit {
	CHECK_EXIT_CLEAN = 0,
	CHECK_EXIT_FAILED = 1,
	CHECK_EXIT_CORRUPT = 2,
	CHECK_EXIT_LEAKS = 3,
};

/* ---- create ------------------------------------------------------------- */

int cmd_create(const struct command *self, int argc, char **argv)
{
	enum { OPT_COMPAT = 1000, OPT_REFCOUNT_BITS };
	static const struct option longopts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "cluster-size", required_argument, NULL, 'c' },
		{ "compat", required_argument, NULL, OPT_COMPAT },
		{ "refcount-bits", required_argument, NULL, OPT_REFCOUNT_BITS },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct qcow_create_opts opts;
	uint64_t size = DEFAULT_VIRTUAL_SIZE;
	uint64_t cluster_size = 0, refcount_bits = 0;
	bool refcount_bits_given = false;
	const char *image;
	char err[1024] = "", what[PATH_MAX + 32];
	int opt, ret;

	qcow_create_opts_default(&opts);
	while ((opt = getopt_long(argc, argv, ":s:c:h", longopts, NULL)) != -1) {
		switch (opt) {
		case 's':
			if (ctl_parse_size(optarg, &size) < 0)
				return ctl_usage_error(self, "invalid size '%s': expected a whole number of bytes "
						   "with an optional K, M, G or T suffix", optarg);
			break;
		case 'c':
			if (ctl_parse_size(optarg, &cluster_size) < 0 || !ctl_is_power_of_two(cluster_size) ||
			    cluster_size < 512 || cluster_size > (2u << 20))
				return ctl_usage_error(self, "invalid cluster size '%s': must be a power of two "
						   "from 512 to 2M", optarg);
			opts.cluster_bits = ctl_log2_exact(cluster_size);
			break;
		case OPT_COMPAT:
			if (strcmp(optarg, "0.10") == 0 || strcmp(optarg, "v2") == 0)
				opts.version = 2;
			else if (strcmp(optarg, "1.1") == 0 || strcmp(optarg, "v3") == 0)
				opts.version = 3;
			else
				return ctl_usage_error(self, "invalid --compat '%s': expected 0.10 or 1.1", optarg);
			break;
		case OPT_REFCOUNT_BITS:
			if (ctl_parse_unsigned(optarg, &refcount_bits) < 0 || !ctl_is_power_of_two(refcount_bits) ||
			    refcount_bits > 64)
				return ctl_usage_error(self, "invalid --refcount-bits '%s': must be 1, 2, 4, 8, 16, "
						   "32 or 64", optarg);
			refcount_bits_given = true;
			break;
		default:
			return ctl_other_option(self, opt, argv);
		}
	}
	ret = ctl_single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return ret;

	/* Checked after all options, so their order does not matter. */
	if (refcount_bits_given) {
		if (opts.version == 2 && refcount_bits != 16)
			return ctl_usage_error(self, "--refcount-bits %" PRIu64 " needs --compat 1.1 "
					   "(compat 0.10 images have 16-bit refcounts)", refcount_bits);
		opts.refcount_order = ctl_log2_exact(refcount_bits);
	} else if (opts.version == 2) {
		opts.refcount_order = 4;
	}
	/* QEMU sees a disk in whole 512-byte sectors and would silently drop
	 * a partial last one; round up as qemu-img create does. */
	if (size > UINT64_MAX - 511)
		return ctl_usage_error(self, "invalid size: %" PRIu64 " bytes is too large", size);
	opts.size = (size + 511) & ~(uint64_t)511;

	snprintf(what, sizeof(what), "cannot create %s", image);
	ctl_engine_call_begin(true);
	ret = qcow_create(image, &opts, err, sizeof(err));
	ctl_engine_call_end(ret, what, err);
	if (ret < 0)
		return EXIT_FAILURE;
	printf("Formatting '%s', fmt=qcow2 cluster_size=%" PRIu64 " compat=%s refcount_bits=%u size=%" PRIu64 "\n",
	       image, (uint64_t)1 << opts.cluster_bits, opts.version == 2 ? "0.10" : "1.1",
	       1u << opts.refcount_order, opts.size);
	return EXIT_SUCCESS;
}

/* ---- check --------------------------------------------------------------- */

static void check_print_human(const struct qcow_check_result *res)
{
	if (res->errors == 0 && res->leaks == 0) {
		printf("No errors were found on the image.\n");
	} else {
		/* Wording of qemu-img check, which scripts grep for. */
		if (res->errors)
			printf("\n%" PRIu64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the image may corrupt it.\n",
			       res->errors);
		if (res->leaks)
			printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
			       "This means waste of disk space, but no harm to data.\n",
			       res->leaks);
	}
	if (res->total_clusters && res->allocated_clusters)
		printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated clusters\n",
		       res->allocated_clusters, res->total_clusters,
		       100.0 * (double)res->allocated_clusters / (double)res->total_clusters);
	printf("Image clusters: %" PRIu64 " used, %" PRIu64 " free below the image end\n",
	       res->clusters_used, res->clusters_free);
	if (res->image_end_offset)
		printf("Image end offset: %" PRIu64 "\n", res->image_end_offset);
}

static void check_print_json(const char *image, const struct qcow_check_result *res)
{
	struct json_writer j = { .out = stdout };

	json_object_begin(&j, NULL);
	json_u64(&j, "image-end-offset", res->image_end_offset);
	json_u64(&j, "total-clusters", res->total_clusters);
	/* qemu's "check-errors" counts checks that could not complete; when
	 * qcow_check returns 0 the whole check ran. */
	json_u64(&j, "check-errors", 0);
	json_u64(&j, "corruptions", res->errors);
	json_u64(&j, "leaks", res->leaks);
	json_u64(&j, "allocated-clusters", res->allocated_clusters);
	json_u64(&j, "used-clusters", res->clusters_used);
	json_u64(&j, "free-clusters", res->clusters_free);
	json_string(&j, "filename", image);
	json_string(&j, "format", "qcow2");
	json_object_end(&j);
}

static enum check_exit check_exit_status(const struct qcow_check_result *res)
{
	if (res->errors)
		return CHECK_EXIT_CORRUPT;
	if (res->leaks)
		return CHECK_EXIT_LEAKS;
	return CHECK_EXIT_CLEAN;
}

int cmd_check(const struct command *self, int argc, char **argv)
{
	struct qcow_check_result res;
	bool json = false;
	const char *image;
	char err[1024] = "", what[PATH_MAX + 32];
	char reason[2048] = "";
	int ret = ctl_parse_json_only(self, argc, argv, &json);

	if (ret == EXIT_SUCCESS)
		return ret;
	if (ret >= 0)
		return CHECK_EXIT_FAILED;   /* usage errors: "could not run", as qemu-img */
	ret = ctl_single_operand(self, argc, argv, "IMAGE", &image);
	if (ret)
		return CHECK_EXIT_FAILED;

	/* The problems are the output of check; with --json they would break
	 * the JSON on stdout, so they go to stderr instead. */
	if (json)
		ctl_engine_log_route(false, stderr);
	else
		ctl_engine_log_route(true, stdout);
	memset(&res, 0, sizeof(res));
	snprintf(what, sizeof(what), "cannot check %s", image);
	ctl_engine_call_begin(false);
	ret = qcow_check(image, &res, err, sizeof(err));
	ctl_engine_log_route(false, stderr);
	ctl_engine_call_end_reason(ret, what, err, reason, sizeof(reason));
	if (ret < 0) {
		if (json)
			json_print_error("filename", image, reason, ret);
		return CHECK_EXIT_FAILED;
	}
	if (json)
		check_print_json(image, &res);
	else
		check_print_human(&res);
	return check_exit_status(&res);
}
