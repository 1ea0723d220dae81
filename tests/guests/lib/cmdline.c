#include "cmdline.h"

#include "bootparams.h"
#include "print.h"
#include "string.h"

static bool is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

bool cmdline_find(const char *cmdline, const char *key, const char **value, size_t *len)
{
	size_t keylen = strlen(key);
	const char *p = cmdline, *end = cmdline + strnlen(cmdline, CMDLINE_MAX);
	bool found = false;

	while (p < end) {
		while (p < end && is_space(*p))
			p++;
		const char *word = p;
		while (p < end && !is_space(*p))
			p++;
		size_t wordlen = (size_t)(p - word);
		if (wordlen > keylen && memcmp(word, key, keylen) == 0 && word[keylen] == '=') {
			*value = word + keylen + 1; /* the last occurrence wins, as in Linux */
			*len = wordlen - keylen - 1;
			found = true;
		}
	}
	return found;
}

static int digit_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return 99;
}

bool parse_u64(const char *s, size_t len, u64 *out)
{
	unsigned base = 10;
	u64 v = 0;

	if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
		len -= 2;
	}
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		int d = digit_value(s[i]);
		if (d >= (int)base || v > (UINT64_MAX - (u64)d) / base)
			return false;
		v = v * base + (u64)d;
	}
	*out = v;
	return true;
}

u64 cmdline_u64(const char *cmdline, const char *key, u64 fallback)
{
	const char *value;
	size_t len;
	u64 v;

	if (!cmdline_find(cmdline, key, &value, &len))
		return fallback;
	if (!parse_u64(value, len, &v)) {
		print("cmdline: %s= is not a number, using %lu\n", key, fallback);
		return fallback;
	}
	return v;
}

u64 cmdline_size(const char *cmdline, const char *key, u64 fallback)
{
	const char *value;
	size_t len;
	unsigned shift = 0;
	u64 v;

	if (!cmdline_find(cmdline, key, &value, &len))
		return fallback;
	if (len > 1) {
		char suffix = value[len - 1];
		shift = suffix == 'K' ? 10 : suffix == 'M' ? 20 : suffix == 'G' ? 30 : 0;
		len -= shift ? 1 : 0;
	}
	if (!parse_u64(value, len, &v) || v > UINT64_MAX >> shift) {
		print("cmdline: %s= is not a size, using %lu\n", key, fallback);
		return fallback;
	}
	return v << shift;
}

bool cmdline_is(const char *cmdline, const char *key, const char *value)
{
	const char *v;
	size_t len;

	return cmdline_find(cmdline, key, &v, &len) && len == strlen(value) &&
	       memcmp(v, value, len) == 0;
}
